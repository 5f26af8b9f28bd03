"""The OpenAI-compatible API (`/v1`): what the `openai` SDKs, Open WebUI, SillyTavern, Home Assistant
and voice-agent frameworks already speak. protocol: schemas; voices: the `voice` lookup; serving:
requests to engine work; router: the routes; voices_router: the voice library's routes."""
