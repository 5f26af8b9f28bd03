// Calls to the server's API: same origin, the API key (if any) in a header, errors as the API words them.

const KEY_STORAGE = "qtts.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** An error response of the API: `message` is the server's own wording. */
export class ApiError extends Error {
  constructor(message, { status = 0, type = null, field = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.field = field;
  }
}

/** A path of the API ("api/v1/...") as a URL relative to the page, so a proxy prefix keeps working. */
export function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), document.baseURI).href;
}

function headersFor(extra) {
  const headers = new Headers(extra);
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  return headers;
}

/** fetch() with the key; resolves to the Response when it is 2xx, else throws an ApiError. */
export async function request(path, { method = "GET", json, body, signal, headers } = {}) {
  const sent = headersFor(headers);
  if (json !== undefined) {
    sent.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(apiUrl(path), { method, headers: sent, body, signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`The server cannot be reached (${err.message}).`);
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (error.status === 401) document.dispatchEvent(new CustomEvent("qtts:unauthorized", { detail: error }));
    throw error;
  }
  return response;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

export async function sendJSON(path, json, { method = "POST", signal } = {}) {
  return (await request(path, { method, json, signal })).json();
}

/** The ApiError of a failed response: the native shape {error: {message, type, field}, detail},
 * OpenAI's {error: {message, code, param}}, or FastAPI's {detail}. */
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: keep the status line
  }
  const error = body && typeof body.error === "object" ? body.error : null;
  const detail = body && typeof body.detail === "string" ? body.detail : null;
  const message = error?.message || detail || `${response.status} ${response.statusText}`.trim();
  return new ApiError(message, {
    status: response.status,
    type: error?.type ?? error?.code ?? null,
    field: error?.field ?? error?.param ?? null,
  });
}

/** Fetch a URL (with the key) and save it as a file named `filename`. */
export async function saveUrl(url, filename) {
  const response = await request(url);
  saveBlob(await response.blob(), filename);
}

export function saveBlob(blob, filename) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}
