// Small DOM helpers.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** el("li", {class: "x", dataset: {id: 1}, onclick}, child, "text", ...) */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

/** Show an error in an alert region, worded as the API worded it; null hides it. */
export function showError(region, error) {
  if (!error) {
    region.hidden = true;
    region.textContent = "";
    return;
  }
  if (error.name === "AbortError") return;
  const status = error.status ? ` (HTTP ${error.status})` : "";
  region.replaceChildren(el("strong", {}, "Error" + status + ": "), error.message || String(error));
  region.dataset.status = error.status || "";
  region.dataset.field = error.field || "";
  region.hidden = false;
  if (error.field) markField(region.closest("form"), error.field);
}

/** Put aria-invalid on the form control an API error names (e.g. "text", "ref_audio", "text[2]"). */
function markField(form, field) {
  if (!form) return;
  const name = field.replace(/\[\d+\]$/, "").replace(/_/g, "-");
  const control = form.querySelector(`[name="${CSS.escape(name)}"], #${CSS.escape(name)}`);
  if (control) {
    control.setAttribute("aria-invalid", "true");
    control.addEventListener("input", () => control.removeAttribute("aria-invalid"), { once: true });
  }
}

/** Disable a button while `work` runs; the button's text says what is happening. */
export async function busy(button, label, work) {
  const original = button.textContent;
  button.disabled = true;
  button.textContent = label;
  button.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.textContent = original;
    button.removeAttribute("aria-busy");
  }
}

/** Show only the children of `root` whose data-<attr> (a space-separated list) includes `value`. */
export function showMatching(root, attr, value) {
  for (const node of $$(`[data-${attr}]`, root)) {
    node.hidden = !node.dataset[attr].split(" ").includes(value);
  }
}

export function fillSelect(select, options, selected) {
  const previous = selected ?? select.value;
  select.replaceChildren(
    ...options.map(({ value, label }) => el("option", { value }, label ?? value)),
  );
  if (options.some((option) => option.value === previous)) select.value = previous;
}

export function formatSeconds(seconds) {
  if (!Number.isFinite(seconds)) return "0:00";
  const whole = Math.max(0, Math.floor(seconds));
  return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")}`;
}

export function formatTime(epochMs) {
  return new Date(epochMs).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}
