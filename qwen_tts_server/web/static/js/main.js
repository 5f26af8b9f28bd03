// The page: wires the API key, the tabs and the server's state to the Speak, Voices, Batch and
// History parts.

import { apiKey, setApiKey } from "./api.js";
import { Batch } from "./batch.js";
import { Catalog } from "./catalog.js";
import { $, showError } from "./dom.js";
import { History } from "./history.js";
import { Player } from "./player.js";
import { Speak } from "./speak.js";
import { watchServer } from "./status.js";
import { Tabs } from "./tabs.js";
import { Voices } from "./voices.js";

const player = new Player({ canvas: $("#waveform"), playButton: $("#play-button"), timeLabel: $("#play-time") });
const history = new History();
const speak = new Speak({ player, history });
const batch = new Batch();
const tabs = new Tabs($(".tabs"), { onChange: (name) => name === "voices" && voices.refresh() });
const voices = new Voices({
  onUse: (name) => {
    tabs.open("speak");
    speak.useVoice(name);
  },
});

/** Everything the server knows that the forms need: models, speakers, languages, voices. */
async function loadServerData() {
  showError($("#speak-error"), null);
  try {
    const catalog = await Catalog.load();
    speak.setCatalog(catalog);
    voices.setCatalog(catalog);
    batch.setCatalog(catalog);
  } catch (err) {
    showError($("#speak-error"), err);
    return;
  }
  await voices.refresh();
  await batch.resume();
}

function setupKey() {
  const panel = $("#key-panel");
  const input = $("#api-key");
  const state = $("#key-state");
  const label = () => (state.textContent = apiKey() ? "API key: set" : "API key");
  input.value = apiKey();
  label();
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey(input.value.trim());
    label();
    panel.open = false;
    loadServerData();
  });
  $("#key-forget").addEventListener("click", () => {
    input.value = "";
    setApiKey("");
    label();
  });
  document.addEventListener("qtts:unauthorized", () => {
    state.textContent = "API key needed";
    panel.open = true;
    input.focus();
  });
}

setupKey();
watchServer($("#server-status"));
loadServerData();
