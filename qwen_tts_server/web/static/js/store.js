// Audio kept in this browser (IndexedDB): the WAV of streamed results, which the server did not store.

const DB_NAME = "qtts";
const STORE = "audio";

let opening = null;

function open() {
  opening ??= new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  return opening;
}

async function run(mode, action) {
  const db = await open();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const req = action(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req?.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

export const putAudio = (key, blob) => run("readwrite", (store) => store.put(blob, key));
export const getAudio = (key) => run("readonly", (store) => store.get(key));
export const deleteAudio = (key) => run("readwrite", (store) => store.delete(key));
export const clearAudio = () => run("readwrite", (store) => store.clear());
