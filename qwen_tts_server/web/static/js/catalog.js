// What the server's models speak (GET api/v1/speakers): models per mode, speakers, languages.

import { getJSON } from "./api.js";

const MODEL_TYPES = { custom_voice: "custom_voice", voice_design: "voice_design", voice_clone: "base" };
const FALLBACK_LANGUAGES = ["auto"];

export class Catalog {
  constructor(body = { defaults: {}, models: [] }) {
    this.defaults = body.defaults;
    this.models = body.models;
  }

  static async load() {
    return new Catalog(await getJSON("api/v1/speakers"));
  }

  /** The models of a mode (by type, or by the published naming when a model is not on disk yet). */
  modelsFor(mode) {
    const type = MODEL_TYPES[mode];
    return this.models.filter((model) => (model.model_type ?? typeFromName(model.name)) === type);
  }

  model(mode, name) {
    const wanted = name || this.defaults[mode];
    return this.models.find((model) => model.name === wanted) ?? null;
  }

  speakers(name) {
    return this.model("custom_voice", name)?.speakers ?? [];
  }

  languages(mode, name) {
    const languages = this.model(mode, name)?.languages;
    return languages?.length ? languages : FALLBACK_LANGUAGES;
  }

  acceptsInstruct(name) {
    return this.model("custom_voice", name)?.accepts_instruct !== false;
  }

  isLoaded(mode, name) {
    return this.model(mode, name)?.state === "loaded";
  }
}

function typeFromName(name) {
  if (/CustomVoice$/i.test(name)) return "custom_voice";
  if (/VoiceDesign$/i.test(name)) return "voice_design";
  if (/Base$/i.test(name)) return "base";
  return null;
}

export function languageOptions(languages) {
  return languages.map((value) => ({
    value,
    label: value === "auto" ? "Auto-detect" : value.charAt(0).toUpperCase() + value.slice(1),
  }));
}

export function speakerOptions(speakers) {
  return speakers.map((value) => ({
    value,
    label: value
      .split("_")
      .map((word) => word.charAt(0).toUpperCase() + word.slice(1))
      .join(" "),
  }));
}
