// The playground: a plain script (no build step, no framework) over this server's OpenAI API.
// Previews come from `stream=true` (Server-Sent Events read from fetch, since EventSource cannot
// POST). A stream carries one image, so n images with previews are n streamed requests, one
// after the other (seed, seed + 1, ... as one request with n would use); with previews off it is
// one ordinary request, whose Server-Timing header gives the server's stage timings.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "qwen-image-edit.api-key";
const state = {
  settings: null,
  models: [],
  images: [], // {file, url, width, height}
  maxImages: 3,
  maskDirty: false,
  controller: null,
  // The error shown is the page's own check of the form ("Write a prompt."): it goes once the
  // user fixes the form, where a server's error stays until the next edit.
  formError: false,
  // An edit is running whose first image has not come yet: the last results stay until it does,
  // so a failed edit leaves them in place.
  keepResults: false,
  sentImage: null, // the first image of the last edit sent: the "before" of its results
};

// ---- server info --------------------------------------------------------------------------

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The server's OpenAI error JSON as one line; anything else (a proxy's page) as its status.
async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    /* not JSON */
  }
  return errorFromBody(body, response.status);
}

function errorFromBody(body, status) {
  const err = body && typeof body.error === "object" && body.error;
  const error = new Error(err && err.message ? err.message : `HTTP ${status}`);
  error.status = status;
  error.param = (err && err.param) || null;
  error.code = (err && err.code) || null;
  return error;
}

async function loadSettings() {
  const response = await fetch("playground/config.json");
  if (!response.ok) throw await errorOf(response);
  state.settings = await response.json();
  const s = state.settings;
  $("auth-section").hidden = !s.auth_required;
  $("steps").max = s.max_steps;
  $("steps").placeholder = `${s.default_steps} (server default)`;
  $("n").max = s.max_n;
  $("prompt").maxLength = s.max_prompt_chars;
  $("demo-notice").hidden = !s.random_weights;
  $("model-source").textContent = s.model_source || "?";
  fillSizes(s);
}

function fillSizes(s) {
  const select = $("size");
  for (const [w, h] of [[256, 256], [512, 512], [768, 768], [1024, 1024], [1328, 1328],
    [1024, 768], [768, 1024], [1184, 880], [880, 1184]]) {
    const fits = [w, h].every((v) => v >= s.min_output_side && v <= s.max_output_side);
    if (fits && w * h <= s.max_output_pixels) select.add(new Option(`${w}x${h}`, `${w}x${h}`));
  }
  select.add(new Option("custom…", "custom"));
}

async function pollReady() {
  const pill = $("server-status");
  try {
    const response = await fetch("ready");
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      pill.textContent = `ready · ${body.model || "model"}`;
      pill.dataset.state = "ready";
      return;
    }
    pill.textContent = (body.error && body.error.message) || `not ready (HTTP ${response.status})`;
    pill.dataset.state = "waiting";
  } catch (_) {
    pill.textContent = "server unreachable";
    pill.dataset.state = "down";
  }
  setTimeout(pollReady, 5000);
}

async function loadModels() {
  const response = await fetch("v1/models", { headers: authHeaders() });
  if (response.status === 401) {
    $("auth-section").hidden = false;
    showError(await errorOf(response), "Enter this server's API key to use it.");
    return;
  }
  if (!response.ok) throw await errorOf(response);
  // The key worked: its 401 message goes, not a message about the form (the key field's change
  // event may fire when the user clicks Edit, just after the page said "Write a prompt.").
  if (!state.formError) hideError();
  state.models = (await response.json()).data || [];
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  if (state.models.some((m) => m.id === chosen)) select.value = chosen;
  onModelChange();
}

function onModelChange() {
  const model = state.models.find((m) => m.id === $("model").value);
  const meta = (model && model.metadata) || {};
  state.maxImages = meta.max_input_images || 3;
  $("max-images").textContent = String(state.maxImages);
  if (meta.default_steps) $("steps").placeholder = `${meta.default_steps} (model default)`;
  if (state.images.length > state.maxImages) {
    state.images.splice(state.maxImages).forEach((img) => URL.revokeObjectURL(img.url));
    renderImages();
  }
}

// ---- input images -------------------------------------------------------------------------

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("not an image this browser can read"));
    img.src = url;
  });
}

async function addFiles(files) {
  const wanted = [...files].filter((f) => f.type.startsWith("image/"));
  const refused = [...files].filter((f) => !f.type.startsWith("image/"));
  const room = state.maxImages - state.images.length;
  // Said beside the box the files were dropped on, where the eyes are.
  const notes = [];
  if (refused.length) {
    const names = refused.map((f) => f.name || "a file").join(", ");
    notes.push(`${names}: not an image. Drop PNG, JPEG or WebP files.`);
  }
  if (wanted.length > room) {
    notes.push(`This model takes at most ${state.maxImages} image(s); extra files were left out.`);
  }
  $("drop-note").textContent = notes.join(" ");
  $("drop-note").hidden = notes.length === 0;
  if (wanted.length && state.formError) hideError(); // "Add at least one image." is answered
  for (const file of wanted.slice(0, Math.max(0, room))) {
    const url = URL.createObjectURL(file);
    try {
      const img = await loadImage(url);
      state.images.push({ file, url, width: img.naturalWidth, height: img.naturalHeight });
    } catch (err) {
      URL.revokeObjectURL(url);
      showError(new Error(`${file.name}: ${err.message}`));
    }
  }
  renderImages();
}

function renderImages() {
  const list = $("thumbs");
  list.replaceChildren(
    ...state.images.map((img, i) => {
      const li = document.createElement("li");
      const thumb = document.createElement("img");
      thumb.src = img.url;
      thumb.alt = img.file.name;
      const label = document.createElement("span");
      label.textContent = `${i === 0 ? "edited" : "reference"} · ${img.width}x${img.height}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.title = `Remove ${img.file.name}`;
      remove.addEventListener("click", () => {
        if (img !== state.sentImage) URL.revokeObjectURL(img.url); // a result's "before"
        state.images.splice(i, 1);
        renderImages();
      });
      li.append(thumb, label, remove);
      return li;
    }),
  );
  setupMask();
}

// ---- mask: painted strokes become the transparent (repaint) area of OpenAI's alpha mask -----

function setupMask() {
  // The server applies a mask to single-image edits only (it is the first image's).
  const first = state.images.length === 1 ? state.images[0] : null;
  $("mask-section").hidden = !first;
  const canvas = $("mask-canvas");
  if (!first) {
    state.maskDirty = false;
    return;
  }
  if ($("mask-image").src !== first.url) {
    $("mask-image").src = first.url;
    canvas.width = first.width;
    canvas.height = first.height;
    state.maskDirty = false;
  }
}

function setupPainting() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) / box.width) * canvas.width,
      y: ((event.clientY - box.top) / box.height) * canvas.height,
    };
  };
  const stroke = (from, to) => {
    ctx.strokeStyle = ctx.fillStyle = "rgb(255, 40, 120)";
    ctx.lineWidth = (Number($("brush-size").value) / 100) * canvas.width;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    state.maskDirty = true;
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  const end = () => {
    last = null;
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("mask-clear").addEventListener("click", () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    state.maskDirty = false;
  });
}

// OpenAI's mask: a PNG the size of the first image; fully transparent pixels are repainted.
function maskBlob() {
  if (!state.maskDirty || state.images.length !== 1) return Promise.resolve(null);
  const painted = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = painted.width;
  out.height = painted.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = "destination-out";
  ctx.drawImage(painted, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// ---- the request --------------------------------------------------------------------------

function chosenSize() {
  const value = $("size").value;
  return value === "custom" ? $("custom-size").value.trim() || "auto" : value;
}

function formFor({ stream, n, seed, mask }) {
  const form = new FormData();
  // One image goes as `image`, several as `image[]`, as the official clients send them.
  const field = state.images.length === 1 ? "image" : "image[]";
  for (const img of state.images) form.append(field, img.file, img.file.name);
  if (mask) form.append("mask", mask, "mask.png");
  form.append("prompt", $("prompt").value);
  form.append("model", $("model").value);
  form.append("size", chosenSize());
  form.append("n", String(n));
  form.append("output_format", $("format").value);
  const optional = {
    num_inference_steps: $("steps").value,
    seed: seed === null ? "" : String(seed),
    negative_prompt: $("negative-prompt").value,
    true_cfg_scale: $("cfg").value,
  };
  for (const [key, value] of Object.entries(optional)) if (value !== "") form.append(key, value);
  if (stream) {
    form.append("stream", "true");
    form.append("partial_images", $("partials").value);
  }
  return form;
}

function parseEvent(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return { event, data: data.length ? JSON.parse(data.join("\n")) : null };
}

// POST one streamed edit; calls onEvent for each SSE event until the completed one.
async function streamEdit(form, signal, onEvent) {
  const response = await fetch("v1/images/edits", {
    method: "POST", body: form, headers: authHeaders(), signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const { event, data } = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event === "error" || (data && data.type === "error")) throw errorFromBody(data, 500);
      if (data) onEvent(data);
      if (data && data.type === "image_edit.completed") return;
    }
  }
  throw new Error("The stream ended before the image was complete.");
}

async function batchEdit(form, signal) {
  const response = await fetch("v1/images/edits", {
    method: "POST", body: form, headers: authHeaders(), signal,
  });
  if (!response.ok) throw await errorOf(response);
  return { body: await response.json(), serverTiming: response.headers.get("Server-Timing") };
}

// ---- output -------------------------------------------------------------------------------

const MIME = { png: "image/png", jpeg: "image/jpeg", webp: "image/webp" };

function b64Blob(b64, format) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: MIME[format] || "application/octet-stream" });
}

function setStatus(text, phase) {
  $("status").textContent = text;
  if (phase) $("output").dataset.state = phase;
}

function showError(err, hint) {
  const box = $("error");
  const where = err.param ? ` (${err.param})` : "";
  const status = err.status ? `${err.status}${where}: ` : "";
  box.textContent = `${status}${err.message}${hint ? ` ${hint}` : ""}`;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
  state.formError = false;
}

// The page's own objection to the form, cleared as soon as the form changes.
function showFormError(message) {
  showError(new Error(message));
  state.formError = true;
}

function showPreview(event, label) {
  const url = URL.createObjectURL(b64Blob(event.b64_json, event.output_format));
  $("live").hidden = false;
  const live = $("live-image");
  if (live.src.startsWith("blob:")) URL.revokeObjectURL(live.src);
  live.src = url;
  $("live-caption").textContent = `${label}: preview ${event.partial_image_index + 1}`;
  const frame = document.createElement("img");
  frame.src = URL.createObjectURL(b64Blob(event.b64_json, event.output_format));
  frame.alt = `${label}, partial image ${event.partial_image_index + 1}`;
  $("previews").append(frame);
}

// Old results go when the first image of the next edit arrives, not when it starts.
function dropKeptResults() {
  if (!state.keepResults) return;
  state.keepResults = false;
  for (const img of document.querySelectorAll("#results img.after")) URL.revokeObjectURL(img.src);
  $("results").replaceChildren();
}

// A span that never breaks inside (a size, a seed): a number split over two lines misreads.
function unbroken(text, className) {
  const span = document.createElement("span");
  span.className = className ? `nowrap ${className}` : "nowrap";
  span.textContent = text;
  return span;
}

// Before/after: the input image under the result, the result clipped from the left at the
// slider's position (--split), so dragging it uncovers the input. Plain CSS clip-path.
function compareStage(url, index, size, before) {
  const stage = document.createElement("div");
  stage.className = "compare";
  const after = document.createElement("img");
  after.className = "after";
  after.src = url;
  after.alt = `Edited image ${index + 1}`;
  after.dataset.size = size;
  stage.append(after);
  if (!before) return { stage, slider: null };
  const under = document.createElement("img");
  under.className = "before";
  under.src = before.url;
  under.alt = `Input image (${before.file.name})`;
  stage.prepend(under);
  const slider = document.createElement("input");
  slider.type = "range";
  slider.min = "0";
  slider.max = "100";
  slider.value = "50";
  slider.className = "split";
  slider.setAttribute("aria-label", `Before/after: image ${index + 1} against its input`);
  const place = () => stage.style.setProperty("--split", `${slider.value}%`);
  slider.addEventListener("input", place);
  place();
  return { stage, slider };
}

function addResult({ b64, format, size, seed, seedNote, index }) {
  dropKeptResults();
  const url = URL.createObjectURL(b64Blob(b64, format));
  const card = document.createElement("figure");
  card.className = "result";
  // The input is kept as sent (this edit's), even if the user changes the images afterwards.
  const { stage, slider } = compareStage(url, index, size, state.sentImage);
  card.append(stage);
  if (slider) {
    const labels = document.createElement("div");
    labels.className = "split-labels";
    labels.append(unbroken("◀ before"), slider, unbroken("after ▶"));
    card.append(labels);
  }
  const caption = document.createElement("figcaption");
  const info = document.createElement("span");
  info.className = "seed";
  info.append(
    unbroken(size),
    " · ",
    unbroken(`seed ${seed ?? "random"}`, "seed-value"),
    seedNote ? ` (${seedNote})` : "",
  );
  const download = document.createElement("a");
  download.className = "button";
  download.href = url;
  download.download = `edit-${seed ?? Date.now()}-${index + 1}.${format === "jpeg" ? "jpg" : format}`;
  download.textContent = "Download";
  caption.append(info, download);
  card.append(caption);
  $("results").append(card);
}

function showTimings(rows) {
  const table = $("timings");
  table.tBodies[0].replaceChildren(
    ...rows.map(([name, value]) => {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.textContent = name;
      const td = document.createElement("td");
      td.textContent = value;
      tr.append(th, td);
      return tr;
    }),
  );
  $("timings-box").hidden = rows.length === 0;
}

// `name;dur=12.3, ...` -> [[name, "12.3 ms"], ...]
function serverTimingRows(header) {
  if (!header) return [];
  return header.split(",").map((entry) => {
    const [name, ...params] = entry.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    const ms = dur ? Number(dur.slice(4)) : NaN;
    return [`server: ${name}`, Number.isFinite(ms) ? formatMs(ms) : "?"];
  });
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`;
}

// The Result card scrolls into view when an edit starts (the Edit button is at the foot of a long
// form). Not a sticky card: that one floats down the page, an empty band above it.
function showOutput() {
  const top = $("output").getBoundingClientRect().top;
  if (top < 0 || top > window.innerHeight * 0.6) $("output").scrollIntoView({ block: "start" });
}

function resetOutput() {
  hideError();
  for (const img of document.querySelectorAll("#previews img")) URL.revokeObjectURL(img.src);
  state.keepResults = true; // until this edit's first image (dropKeptResults)
  $("previews").replaceChildren();
  $("live").hidden = true;
  showTimings([]);
  $("timings-hint").hidden = true;
}

// ---- submit -------------------------------------------------------------------------------

function readSeed() {
  const text = $("seed").value.trim();
  return text === "" ? null : Number(text);
}

async function onSubmit(event) {
  event.preventDefault();
  if (state.images.length === 0) return showFormError("Add at least one image.");
  if (!$("prompt").value.trim()) return showFormError("Write a prompt.");
  resetOutput();
  state.sentImage = state.images[0];
  showOutput();
  const n = Math.max(1, Number($("n").value) || 1);
  const seed = readSeed();
  const previews = Number($("partials").value);
  const mask = await maskBlob();
  const controller = new AbortController();
  state.controller = controller;
  $("submit").disabled = true;
  $("stop").disabled = false;
  const t0 = performance.now();
  try {
    if (previews > 0) await runStreamed({ n, seed, mask, t0, signal: controller.signal });
    else await runBatch({ n, seed, mask, t0, signal: controller.signal });
    setStatus(`Done: ${n} image(s) in ${((performance.now() - t0) / 1000).toFixed(1)} s.`, "done");
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus("Stopped.", "stopped");
    } else {
      const kept = $("results").childElementCount > 0;
      setStatus(kept ? "The edit failed; the last result is kept below." : "The edit failed.", "error");
      showError(err);
    }
  } finally {
    state.controller = null;
    $("submit").disabled = false;
    $("stop").disabled = true;
  }
}

async function runStreamed({ n, seed, mask, t0, signal }) {
  const rows = [];
  for (let i = 0; i < n; i++) {
    const label = n > 1 ? `image ${i + 1} of ${n}` : "image";
    const sent = seed === null ? null : seed + i;
    const start = performance.now();
    let first = null;
    setStatus(`Editing ${label}…`, "running");
    await streamEdit(formFor({ stream: true, n: 1, seed: sent, mask }), signal, (data) => {
      first = first ?? performance.now() - start;
      if (data.type === "image_edit.partial_image") {
        showPreview(data, label);
        setStatus(`Editing ${label}: preview ${data.partial_image_index + 1} received…`, "running");
      } else if (data.type === "image_edit.completed") {
        const reported = Number.isInteger(data.seed) ? data.seed : null;
        addResult({
          b64: data.b64_json, format: data.output_format, size: data.size, index: i,
          seed: reported ?? sent, seedNote: reported === null && sent === null ? "not reported" : "",
        });
        $("live").hidden = true;
      }
    });
    rows.push([`${label}: first event`, formatMs(first ?? 0)]);
    rows.push([`${label}: done`, formatMs(performance.now() - start)]);
  }
  rows.push(["total (browser)", formatMs(performance.now() - t0)]);
  showTimings(rows);
  $("timings-hint").hidden = false;
}

async function runBatch({ n, seed, mask, t0, signal }) {
  setStatus(`Editing ${n} image(s)…`, "running");
  const { body, serverTiming } = await batchEdit(formFor({ stream: false, n, seed, mask }), signal);
  body.data.forEach((item, i) => {
    const sent = seed === null ? null : seed + i;
    const reported = Number.isInteger(item.seed) ? item.seed : null;
    addResult({
      b64: item.b64_json, format: body.output_format, size: body.size, index: i,
      seed: reported ?? sent, seedNote: reported === null && sent === null ? "not reported" : "",
    });
  });
  showTimings([...serverTimingRows(serverTiming), ["total (browser)", formatMs(performance.now() - t0)]]);
}

// ---- wiring -------------------------------------------------------------------------------

function setupInputs() {
  const zone = $("dropzone");
  const input = $("file-input");
  zone.addEventListener("click", (e) => {
    if (e.target !== input) input.click();
  });
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") input.click();
  });
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) addFiles(files);
  });
  $("size").addEventListener("change", () => {
    $("custom-size-box").hidden = $("size").value !== "custom";
  });
  $("model").addEventListener("change", onModelChange);
  $("prompt").addEventListener("input", () => {
    if (state.formError && $("prompt").value.trim()) hideError();
  });
  $("edit-form").addEventListener("submit", onSubmit);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    loadModels().catch((err) => showError(err));
  });
}

async function main() {
  setupInputs();
  setupPainting();
  pollReady();
  try {
    await loadSettings();
    await loadModels();
  } catch (err) {
    showError(err);
  }
  document.body.dataset.ready = "true";
}

main();
