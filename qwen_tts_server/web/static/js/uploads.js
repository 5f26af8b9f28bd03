// Reference clips uploaded once (POST api/v1/files/upload): the same clip is not sent twice.

import { request } from "./api.js";

const uploaded = new WeakMap(); // Blob -> file_id

/** Upload `clip` (a File or a recorded WAV Blob) and return its file_id. */
export async function uploadClip(clip) {
  if (uploaded.has(clip)) return uploaded.get(clip);
  const form = new FormData();
  form.append("file", clip, clip.name || "recording.wav");
  const response = await request("api/v1/files/upload", { method: "POST", body: form });
  const { file_id: fileId } = await response.json();
  uploaded.set(clip, fileId);
  return fileId;
}
