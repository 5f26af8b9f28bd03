"""Server settings: every field is an env var `QTTS_<NAME>` and most have a CLI flag.

One `Settings` object is built at start-up and passed down explicitly; nothing reads the
environment anywhere else, so tests build their own `Settings(...)` without touching os.environ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .engine.fast import options

_TRUE = {"1", "true", "t", "yes", "y", "on"}  # how pydantic reads a bool, for options that once were one
_FALSE = {"0", "false", "f", "no", "n"}


def _split_csv(value: object) -> object:
    """Lists come from env vars as comma-separated text (`QTTS_API_KEYS=a,b`)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QTTS_", env_file=None, extra="ignore")

    # --- server ---
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    public_base_url: str | None = Field(
        None, description="Base of download URLs (e.g. https://tts.example.com); default: the request's own."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="When set, every route except /health needs one (Bearer or X-API-Key)."
    )
    log_level: str = "INFO"
    log_json: bool = True

    # --- models ---
    models_dir: Path = Field(Path("models"), description="Local checkpoints: <models_dir>/<model name>.")
    download_source: Literal["huggingface", "modelscope", "none"] = "huggingface"
    hub_org: str = Field("Qwen", description="Organisation hub downloads come from; no other is ever used.")
    extra_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Model names beyond the published five that may be downloaded from hub_org (comma-separated).",
    )
    hub_cache_dir: Path | None = None
    preload_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models to load at start-up, each with its engine's whole warm-up (compile, graphs), "
        "comma-separated; /ready is 503 until they are up. Others load on first use.",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="torch.compile's cache (TORCHINDUCTOR_CACHE_DIR, unless that is set), so a restart "
        "reuses the compiled kernels; default: compile-cache in data_dir.",
    )
    trace_dir: Path | None = Field(
        None,
        description="Diagnostics: write a torch.profiler trace of 30 steps of each fast engine here (Chrome "
        "trace and kernel table; summarise with `python -m bench.trace_summary`). Off by default: tracing "
        "slows the traced steps.",
    )
    trace_after_steps: int = Field(300, ge=1, description="Diagnostics: the trace starts after this many steps.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Several devices of this host (comma-separated, e.g. cuda:0,cuda:1): one engine per device, "
        "each request sent to the least-loaded one; empty: the one `device`.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    memory_budget_gb: float | None = Field(
        None, gt=0, description="Models are unloaded least-recently-used first to stay under this (GB)."
    )
    unload_timeout_s: float = Field(
        30.0, ge=0, description="Unload waits this long for a model's running work, then stops it (that work fails)."
    )
    default_custom_voice_model: str = "Qwen3-TTS-12Hz-1.7B-CustomVoice"
    default_voice_design_model: str = "Qwen3-TTS-12Hz-1.7B-VoiceDesign"
    default_voice_clone_model: str = "Qwen3-TTS-12Hz-1.7B-Base"

    # --- engine, batching and limits ---
    engine: Literal["fast", "reference"] = Field(
        "fast", description="fast: our continuous-batching engine; reference: upstream generate (the oracle)."
    )
    max_slots: int | None = Field(
        None,
        ge=1,
        description="Fast engine: requests decoded together (KV cache rows); unset: half of what the VRAM budget "
        "has left after the loaded models (at most 128; 8 on CPU).",
    )
    compile: bool = Field(True, description="Fast engine on CUDA: fuse each layer's elementwise work (torch.compile).")
    compile_codec: options.CodecCompile = Field(
        options.COMPILE_CODEC,
        description="Fast engine on CUDA, with compile on: what of the streaming codec decoder to compile. snake: its "
        "SnakeBeta activations, one fused kernel each instead of five passes; step: the whole decoder step; off: "
        "nothing. Codec alone, H100, 16 streams (2026-12-06): off 899, snake 1,122 (1.5 s to compile and capture), "
        "step 1,333 audio-s/s (78 s). true/false, as before, mean step/off.",
    )
    fused_attention: options.FusedAttention = Field(
        "all",
        description="Fast engine on CUDA: decode attention as one Triton kernel per layer (q/k norm, RoPE, the KV "
        "cache write and attention; engine/fast/attention_kernel.py) instead of six compiled kernels. all: the "
        "talker's 28 layers and the code predictor's 75 a frame; predictor: the code predictor's alone (16 keys "
        "each); off: the torch path. Frames only (H100, compiled with graphs, 1.7B, 2026-12-07, one process): off "
        "6.08 ms a frame at one row and 8.58 at 64, predictor 5.80 and 7.53, all 5.29 and 6.67. Through the server "
        "(one H100): all 14.1x one stream and 375 audio-s/s at 64 clients, predictor 13.6x and 353.",
    )
    gc_freeze: bool = Field(
        True,
        description="After a fast engine's warm-up, collect once and freeze what exists out of Python's garbage "
        "collector scans (a full scan of a loaded model's objects stops every thread for a few hundred ms).",
    )
    max_context: int = Field(
        options.MAX_CONTEXT, ge=64, description="Fast engine: prompt + frames per request (KV length)."
    )
    max_prefill_tokens: int = Field(
        options.MAX_PREFILL_TOKENS, ge=1, description="Fast engine: prompt positions admitted per step."
    )
    admit_wait_ms: float = Field(
        40.0,
        ge=0,
        description="Fast engine: while others run, a new request waits up to this long to be prefilled with "
        "the next arrivals (one prefill per step would halve throughput under steady load).",
    )
    codec_wait_ms: float = Field(
        100.0,
        ge=0,
        description="Fast engine: while others run, a stream's steady chunk (once the stream is well ahead of real "
        "time; a whole utterance's chunks always) waits up to this long for others to be decoded to audio with (the "
        "codec is several times more efficient many at a time). With the context chunk decoder a finished whole "
        "utterance waits likewise.",
    )
    codec_gather_streams: int = Field(
        options.CODEC_GATHER_STREAMS,
        ge=1,
        description="Fast engine: how many streams' steady chunks a codec batch waits for (up to codec_wait_ms) "
        "while more streams run. More: larger batches, less GPU time an audio second; a steady chunk may wait "
        "longer (only chunks of streams well ahead of real time wait).",
    )
    max_batch_size: int = Field(16, ge=1, description="Reference engine: largest batch sent to the GPU at once.")
    batch_window_ms: float = Field(
        15.0, ge=0, description="Reference engine: how long to wait for other requests to merge."
    )
    max_items_per_request: int = Field(64, ge=1)
    max_text_chars: int = Field(
        20000, ge=1, description="Per item; text over `segment_chars` is generated as consecutive segments."
    )
    max_instruct_chars: int = Field(1000, ge=1)
    max_audio_seconds: float = Field(300.0, gt=0, description="Upper bound on generated audio per item.")
    voice_cache_entries: int = Field(256, ge=1)
    max_queue: int = Field(
        256,
        ge=0,
        description="Items per model that may wait for an engine row; beyond it a request is refused at once "
        "with 429 and Retry-After, and /ready reports the model saturated.",
    )
    segment_chars: int = Field(
        300, ge=20, description="Long text is generated as consecutive segments of about this many characters."
    )

    # --- streaming and the OpenAI API ---
    stream_first_chunk_frames: int = Field(
        options.STREAM_FIRST_FRAMES,
        ge=1,
        description="Streaming: frames (80 ms each) in a stream's first audio chunk; later ones grow.",
    )
    stream_chunk_frames: int = Field(
        options.STREAM_CHUNK_FRAMES,
        ge=1,
        description="Streaming: the largest chunk, in frames; a stream's chunks double from the first up to this.",
    )
    stream_decoder: options.StreamDecoder = Field(
        options.STREAM_DECODER,
        description="Codec decode in chunks: stateful carries the decoder's causal state across chunks (exactly "
        "the whole-utterance audio), and decodes whole utterances in chunks too while they are generated; context "
        "re-decodes 25 frames before each chunk (approximate) and decodes whole utterances in one piece at their end.",
    )
    ws_idle_timeout_s: float = Field(
        60.0, gt=0, description="WebSocket: a client that sends nothing for this long is disconnected."
    )
    ws_max_message_bytes: int = Field(64 * 1024, ge=1024, description="WebSocket: largest client message.")
    openai_default_model: str | None = Field(
        None,
        description="Model behind the OpenAI names tts-1, tts-1-hd and gpt-4o-mini-tts; unset: the default "
        "model of the mode the request asks for.",
    )

    # --- files ---
    data_dir: Path = Field(
        Path("data"), description="Uploaded and generated files, stored voices, and their SQLite index."
    )
    database_url: str | None = Field(
        None,
        repr=False,
        description="Metadata of files, voices and jobs (SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db): "
        "shared by API replicas and workers; default: SQLite in data_dir.",
    )
    broker_url: str | None = Field(
        None,
        repr=False,
        description="Celery broker for jobs (redis://host:6379/0): the API enqueues, `qwen-tts-server worker` "
        "processes run them; default: jobs run inside the server.",
    )
    job_concurrency: int | None = Field(
        None,
        ge=1,
        description="Job items an engine runs at once (in-process runner, or a worker's threads); default: "
        "max_slots when set, else 64 on CUDA and 8 on CPU.",
    )
    max_job_items: int = Field(10_000, ge=1, description="Largest job (items per POST /api/v1/jobs).")
    max_open_job_items: int = Field(
        100_000,
        ge=1,
        description="Job items queued or running, all jobs together; a job that would pass it gets 429 with "
        "Retry-After instead of waiting without bound.",
    )
    job_visibility_timeout_s: float = Field(
        900.0,
        gt=0,
        description="Worker pool: an item whose worker has not finished it after this long is delivered to "
        "another worker (the first was killed); must exceed the longest item. The API sends a task the broker "
        "lost again after it: set it alike on both.",
    )
    job_runner_lease_s: float = Field(
        60.0,
        gt=0,
        description="In-process jobs: a server not seen alive for this long is taken for dead, and the items it "
        "left running are taken up by another (or by itself, restarted under another host name or port). Keep "
        "it above the longest database outage and the hosts' clock differences.",
    )
    file_ttl_s: float = Field(24 * 3600.0, gt=0)
    cleanup_interval_s: float = Field(60.0, gt=0)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_json_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest JSON request body; larger ones get 413 before they are read. Base64 reference audio "
        "takes 4/3 of its size: the default fits a 20 MB clip. Multipart uploads may be max_upload_bytes + 1 MiB.",
    )
    min_ref_audio_s: float = Field(1.0, ge=0)
    max_ref_audio_s: float = Field(60.0, gt=0)
    ref_audio_url_timeout_s: float = Field(10.0, gt=0)
    allow_private_urls: bool = Field(
        False, description="Let ref_audio URLs reach loopback/private hosts (tests, trusted networks only)."
    )
    allowed_audio_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Directories whose files may be named as ref_audio paths."
    )

    # --- clients of the earlier voice-cloning service, browsers on other origins (README: compatibility) ---
    inline_audio_default: bool = Field(
        False,
        description="Native synthesis results carry each item's audio as base64 (items[].audio_base64) unless "
        "the request sends return_audio_inline: false.",
    )
    clone_without_transcript: Literal["error", "xvector"] = Field(
        "error",
        description="/api/v1/voice-clone without ref_text: error (422) or xvector (clone from the speaker "
        "embedding alone, with a warning). The compatibility clone routes always do xvector.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins browsers may call the API from (comma-separated, * for any); empty: no CORS.",
    )
    url_signing_key: str | None = Field(
        None,
        repr=False,
        description="Key of the signed download URLs handed out while API keys are on; default: derived from "
        "the API keys.",
    )

    @field_validator(
        "api_keys", "allowed_audio_dirs", "extra_models", "cors_origins", "devices", "preload_models", mode="before"
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("compile_codec", mode="before")
    @classmethod
    def _codec_bool(cls, value: object) -> object:
        """Once a switch for the whole step: its true and false keep their meaning. Any case."""
        if isinstance(value, bool | int) and value in (0, 1):
            return "step" if value else "off"
        if isinstance(value, str):
            value = value.strip().lower()
            if value in _TRUE | _FALSE:
                return "step" if value in _TRUE else "off"
        return value

    @field_validator("devices")
    @classmethod
    def _explicit_devices(cls, value: list[str]) -> list[str]:
        """Two engines both on "auto" would share one device without saying so: several must be named."""
        if len(value) > 1 and "auto" in value:
            raise ValueError("list the devices explicitly (e.g. cuda:0,cuda:1); 'auto' is one device")
        return value

    @property
    def compile_cache(self) -> Path:
        return self.compile_cache_dir or self.data_dir / "compile-cache"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "registry.sqlite3"

    @property
    def metadata_url(self) -> str:
        """The database of files, voices and jobs (storage.database)."""
        return self.database_url or f"sqlite:///{self.db_path.resolve()}"

    @property
    def voices_dir(self) -> Path:
        """Stored voices' prompts (safetensors); their metadata is in db_path."""
        return self.data_dir / "voices"
