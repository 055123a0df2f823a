// Voice studio page: plain JavaScript, no build step, no network but this server. Every URL is relative, so the
// page works at / and behind Home Assistant's ingress path (the server sets <base href>).
"use strict";

const $ = (id) => document.getElementById(id);
const LABELS = {
  engine: "Engine", state: "State", model: "Model", device: "Device", precision: "Precision", tensorrt: "TensorRT",
  streaming: "Streaming", voices_prepared: "Prepared voices", voices_failed: "Failed voices", normalizer: "Normalizer",
  gpu: "GPU", gpu_memory: "GPU memory", gpu_utilization: "GPU load", driver: "Driver", cuda_driver: "CUDA (driver)",
  compute_capability: "Compute capability", gpu_note: "GPU note", sample_rate: "Sample rate", prompt_cache: "Prompt cache",
  warmup: "Warm-up", lifecycle: "Model state", keep_alive: "Park after", last_wake: "Last wake", vram_held: "VRAM held",
};
const studio = {
  token: sessionStorage.getItem("studio-token") || "",
  status: null,
  voices: [],
  audio: null, // {blob, name}: the recording to check and save
  audio_url: null,
  checked: false,
  player: null, // the running audition
  recorder: null,
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function headers(extra = {}) {
  const all = { "X-Requested-With": "studio", ...extra };
  if (studio.token) all["X-Studio-Token"] = studio.token;
  return all;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    if (response.status === 401) askForToken();
    const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return body;
}

function askForToken() {
  const box = $("token-box");
  box.hidden = false;
  box.scrollIntoView({ block: "start" });
  $("token").focus();
}

function notify(text, isError = false) {
  const box = $("notice");
  box.replaceChildren(el("span", { text }), " ", el("button", { class: "ghost", type: "button", text: "Dismiss",
    onclick: () => { box.hidden = true; } }));
  box.className = isError ? "notice error" : "notice";
  box.hidden = false;
  box.dataset.kind = isError ? "error" : "info";
}

function seconds(value) { return value == null ? "—" : `${Number(value).toFixed(1)} s`; }

// -- waveform pictures --------------------------------------------------------------------------------------------

function wavePicture(peaks) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "wave");
  svg.setAttribute("viewBox", `0 0 ${peaks.length} 40`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "waveform of the reference recording");
  let d = "";
  peaks.forEach((peak, i) => {
    const h = Math.max(0.6, peak * 38);
    d += `M${i + 0.15} ${20 - h / 2}h0.7v${h}h-0.7z`;
  });
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", d);
  svg.append(path);
  return svg;
}

async function loadWave(name, holder) {
  try {
    const data = await api(`api/voices/${encodeURIComponent(name)}/envelope`);
    holder.replaceChildren(wavePicture(data.peaks));
    holder.dataset.loaded = "1";
  } catch (_) {
    holder.replaceChildren(el("span", { class: "hint", text: "no waveform" }));
  }
}

// -- engine and voices --------------------------------------------------------------------------------------------

async function loadStatus() {
  const status = await api("api/status");
  studio.status = status;
  if (status.token_required && !studio.token) $("token-box").hidden = false;
  const main = status.engines.find((e) => e.main) || status.engines[0];
  $("engine-line").textContent = main ? `engine ${main.name}, ${status.in_flight}/${status.max_concurrent} requests in flight` : "no engine";
  const facts = $("health");
  facts.replaceChildren();
  for (const engine of status.engines) {
    const add = (label, value) => facts.append(el("div", {}, el("dt", { text: label }), el("dd", { text: String(value) })));
    add(engine.main ? "Engine" : "Also engine", engine.name);
    for (const [key, value] of Object.entries(engine.health)) {
      if (key === "engine" || value === null || typeof value === "object") continue;
      add(LABELS[key] || key.replace(/_/g, " "), value);
    }
  }
  const addFact = (label, value) => facts.append(el("div", {}, el("dt", { text: label }), el("dd", { text: value })));
  addFact("In-flight requests", `${status.in_flight} of ${status.max_concurrent}`);
  if (status.preparing.length) addFact("Preparing", status.preparing.join(", "));
  for (const [name, why] of Object.entries(status.failed_engines)) addFact(`${name} (not running)`, why);
  if (status.note) addFact("Note", status.note);
}

function voiceCard(voice) {
  const badges = [el("span", { class: `badge ${voice.state}`, text: voice.state })];
  if (voice.default) badges.push(el("span", { class: "badge default", text: "default" }));
  const wave = el("div", { class: "wave-holder" });
  const length = voice.seconds == null ? (voice.has_reference ? "—" : "no reference")
    : `${seconds(voice.seconds)} (${seconds(voice.kept_seconds)} kept)`;
  const reasons = el("ul", { class: "reason" });
  // The card already names the voice: show the problem without its "folder: voice 'name':" prefix.
  if (voice.problem) reasons.append(el("li", { class: "bad", text: voice.problem.replace(/^.*?voice '[^']*': /, "") }));
  for (const warning of voice.warnings) reasons.append(el("li", { class: "warn", text: warning }));
  const actions = el("div", { class: "actions" });
  if (voice.state !== "broken") {
    actions.append(el("button", { type: "button", class: "ghost", text: "▶ Audition", onclick: () => pickForAudition(voice.name) }));
  }
  if (voice.editable) {
    actions.append(el("button", { type: "button", class: "ghost", text: "Edit", onclick: () => openEdit(voice) }));
    actions.append(el("button", { type: "button", class: "danger", text: "Remove", "data-remove": voice.name,
      onclick: () => removeVoice(voice.name) }));
  }
  const card = el("article", { class: `voice ${voice.state}`, "data-voice": voice.name, "data-state": voice.state },
    el("div", { class: "title" }, el("span", { class: "name", text: voice.name }), ...badges),
    el("div", { class: "desc", text: voice.description }),
    el("div", { class: "meta" },
      // What a listener hears from the running engine (espeak never uses the recording), not only the mode.
      el("span", { text: voice.languages.join(", ") }),
      el("span", { class: "heard", text: voice.heard_as ? `heard as: ${voice.heard_as}` : voice.mode.replace("_", "-") }),
      el("span", { text: `engine ${voice.engine}` }), el("span", { text: length }),
      el("span", { text: voice.origin })),
    wave,
    voice.problem || voice.warnings.length ? reasons : null,
    actions);
  if (voice.has_reference) loadWave(voice.name, wave);
  return card;
}

let pollTimer = null;
async function loadVoices() {
  const data = await api("api/voices");
  studio.voices = data.voices;
  const list = $("voices");
  list.replaceChildren(...data.voices.map(voiceCard));
  if (!data.voices.length) list.append(el("p", { class: "hint", text: "No voices yet: add one below." }));
  $("skipped").replaceChildren(...data.skipped.map((line) => el("li", { text: `skipped: ${line}` })));
  const select = $("audition-voice");
  const chosen = select.value;
  select.replaceChildren(...data.voices.filter((v) => v.state !== "broken")
    .map((v) => el("option", { value: v.name, text: `${v.name} — ${v.description}` })));
  if (chosen && data.voices.some((v) => v.name === chosen)) select.value = chosen;
  clearTimeout(pollTimer);
  if (data.voices.some((v) => v.state === "preparing")) pollTimer = setTimeout(refresh, 1000);
}

async function refresh() {
  try { await Promise.all([loadStatus(), loadVoices()]); } catch (err) { notify(`Could not load: ${err.message}`, true); }
}

function pickForAudition(name) {
  $("audition-voice").value = name;
  $("audition").scrollIntoView({ behavior: "smooth", block: "start" });
  $("audition-text").focus();
}

async function removeVoice(name) {
  if (!window.confirm(`Remove the voice "${name}"? Its folder (recording and texts) is deleted.`)) return;
  try {
    const body = await api(`api/voices/${encodeURIComponent(name)}`, { method: "DELETE" });
    notify(`Voice "${name}" removed. ${body.note}`);
  } catch (err) { notify(`Not removed: ${err.message}`, true); }
  await refresh();
}

function openEdit(voice) {
  $("edit-name").textContent = voice.name;
  $("edit-description").value = voice.description;
  $("edit-languages").value = voice.languages.join(", ");
  $("edit-transcript").value = voice.transcript;
  const dialog = $("edit-dialog");
  dialog.dataset.editing = voice.name;
  dialog.returnValue = "";
  dialog.showModal();
}

async function saveEdit() {
  const dialog = $("edit-dialog");
  if (dialog.returnValue !== "save") return;
  const name = dialog.dataset.editing;
  const body = { description: $("edit-description").value, languages: $("edit-languages").value,
    transcript: $("edit-transcript").value };
  try {
    const answer = await api(`api/voices/${encodeURIComponent(name)}`,
      { method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    notify(`Voice "${name}" saved. ${answer.note}`);
  } catch (err) { notify(`Not saved: ${err.message}`, true); }
  await refresh();
}

// -- audition: stream WAV chunks into Web Audio as they arrive -----------------------------------------------------

function auditionStats(fields) {
  const stats = $("audition-stats");
  Object.assign(stats.dataset, fields);
  const d = stats.dataset;
  const parts = [];
  if (d.firstAudioMs) parts.push(`first audio after ${d.firstAudioMs} ms` + (d.engineMs ? ` (engine ${d.engineMs} ms)` : ""));
  if (Number(d.bytes)) parts.push(`${(Number(d.bytes) / 1024).toFixed(0)} kB, ${Number(d.audioSeconds || 0).toFixed(1)} s of audio`);
  if (d.state === "streaming") parts.push("streaming…");
  if (d.state === "error") parts.push(d.error || "failed");
  stats.textContent = parts.join(" · ") || "—";
}

async function audition(event) {
  event.preventDefault();
  stopAudition();
  const voice = $("audition-voice").value;
  const text = $("audition-text").value.trim();
  if (!text) { notify("Type a sentence to hear.", true); return; }
  const context = studio.context || (studio.context = new (window.AudioContext || window.webkitAudioContext)());
  await context.resume().catch(() => {});
  const player = { abort: new AbortController(), sources: [], playAt: 0 };
  studio.player = player;
  $("audition-stop").disabled = false;
  auditionStats({ bytes: "0", firstAudioMs: "", engineMs: "", audioSeconds: "0", state: "streaming", error: "" });
  const started = performance.now();
  try {
    const response = await fetch("api/audition", { method: "POST", signal: player.abort.signal,
      headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify({ voice, text }) });
    if (!response.ok) {
      let message = `${response.status}`;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
      if (response.status === 401) askForToken();
      throw new Error(message);
    }
    auditionStats({ engineMs: response.headers.get("X-First-Audio-Ms") || "" });
    const reader = response.body.getReader();
    let pending = new Uint8Array(0);
    let format = null;
    let bytes = 0;
    let frames = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      bytes += value.length;
      let data = pending.length ? concat(pending, value) : value;
      if (!format) {
        if (data.length < 44) { pending = data; continue; }
        format = parseWavHeader(data);
        data = data.subarray(44);
      }
      const usable = data.length - (data.length % (format.width * format.channels));
      pending = data.slice(usable);
      if (usable > 0) {
        if (!studio.player.firstAt) {
          studio.player.firstAt = performance.now();
          auditionStats({ firstAudioMs: String(Math.round(studio.player.firstAt - started)) });
        }
        frames += usable / (format.width * format.channels);
        play(context, player, data.subarray(0, usable), format);
      }
      auditionStats({ bytes: String(bytes), audioSeconds: format ? String(frames / format.rate) : "0" });
    }
    auditionStats({ state: "done" });
  } catch (err) {
    if (err.name === "AbortError") auditionStats({ state: "stopped" });
    else { auditionStats({ state: "error", error: err.message }); notify(`Audition failed: ${err.message}`, true); }
  } finally {
    if (studio.player === player) $("audition-stop").disabled = player.sources.length === 0;
  }
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

function parseWavHeader(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, 44);
  return { channels: view.getUint16(22, true), rate: view.getUint32(24, true), width: view.getUint16(34, true) / 8 };
}

function play(context, player, pcm, format) {
  const frames = pcm.length / (format.width * format.channels);
  const buffer = context.createBuffer(1, frames, format.rate);
  const channel = buffer.getChannelData(0);
  const view = new DataView(pcm.buffer, pcm.byteOffset, pcm.length);
  for (let i = 0; i < frames; i++) channel[i] = view.getInt16(i * format.width * format.channels, true) / 32768;
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(context.destination);
  // A small lead (60 ms) absorbs network jitter; later chunks are queued right behind the previous one.
  player.playAt = Math.max(player.playAt, context.currentTime + 0.06);
  source.start(player.playAt);
  player.playAt += buffer.duration;
  player.sources.push(source);
  source.onended = () => {
    player.sources = player.sources.filter((s) => s !== source);
    if (!player.sources.length && studio.player === player) $("audition-stop").disabled = true;
  };
}

function stopAudition() {
  const player = studio.player;
  if (!player) return;
  player.abort.abort();
  for (const source of player.sources) { try { source.stop(); } catch (_) { /* already ended */ } }
  player.sources = [];
  $("audition-stop").disabled = true;
}

// -- adding a voice: upload or record, check, save ----------------------------------------------------------------

function setAudio(blob, name) {
  studio.audio = blob ? { blob, name } : null;
  if (studio.audio_url) URL.revokeObjectURL(studio.audio_url);
  studio.audio_url = blob ? URL.createObjectURL(blob) : null;
  const preview = $("preview");
  preview.hidden = !blob;
  if (blob) preview.src = studio.audio_url; else preview.removeAttribute("src");
  invalidate();
  if (blob) checkVoice();
}

function invalidate() {
  studio.checked = false;
  $("save").disabled = !studio.audio;
  const result = $("check-result");
  if (!result.hidden) result.classList.add("stale");
}

function formData() {
  const data = new FormData();
  for (const id of ["voice-name", "voice-language", "voice-description", "voice-transcript"]) {
    data.append($(id).name, $(id).value);
  }
  if ($("voice-replace").checked) data.append("replace", "1");
  if (studio.token) data.append("token", studio.token);
  if (studio.audio) data.append("audio", studio.audio.blob, studio.audio.name);
  return data;
}

function showReport(report) {
  const box = $("check-result");
  box.hidden = false;
  box.className = `result ${report.state}`;
  box.dataset.state = report.state;
  const parts = [el("p", {}, el("span", { class: `badge ${report.state}`, text: report.state === "broken" ? "cannot be saved" : report.state }),
    " ", el("strong", { text: report.name || "(no name)" }), ` · ${report.language} · ${report.mode.replace("_", "-")}`)];
  if (report.info) {
    const i = report.info;
    parts.push(el("p", { class: "stats", text: `${i.format}, ${i.rate} Hz, ${i.channels} ch, ${seconds(i.seconds)} `
      + `(${seconds(i.kept_seconds)} kept after trimming silence), peak ${i.peak_dbfs} dBFS, ${(i.bytes / 1024).toFixed(0)} kB` }));
  }
  if (report.envelope) parts.push(wavePicture(report.envelope.peaks));
  const list = el("ul", { class: "reason" });
  for (const error of report.errors) list.append(el("li", { class: "bad", text: error }));
  for (const warning of report.warnings) list.append(el("li", { class: "warn", text: warning }));
  if (list.children.length) parts.push(list);
  box.replaceChildren(...parts);
}

async function checkVoice() {
  if (!studio.audio) { showReport({ state: "broken", name: $("voice-name").value, language: $("voice-language").value,
    mode: "-", errors: ["no recording: upload a WAV/FLAC file or record one"], warnings: [] }); return; }
  try {
    const report = await api("api/check", { method: "POST", body: formData() });
    showReport(report);
    studio.checked = report.errors.length === 0;
    $("save").disabled = !studio.checked;
  } catch (err) {
    showReport({ state: "broken", name: $("voice-name").value, language: $("voice-language").value, mode: "-",
      errors: [err.message], warnings: [] });
  }
}

async function saveVoice(event) {
  event.preventDefault();
  if (!studio.checked) { await checkVoice(); if (!studio.checked) return; }
  $("save").disabled = true;
  try {
    const report = await api("api/voices", { method: "POST", body: formData() });
    const heard = report.heard_as ? `it will be heard as: ${report.heard_as}.` : "the server is preparing it.";
    notify(`Voice "${report.name}" saved; ${heard} ${report.note}`);
    $("add-form").reset();
    $("check-result").hidden = true;
    setAudio(null);
  } catch (err) {
    if (err.body && err.body.errors) showReport(err.body);
    notify(`Not saved: ${err.message}`, true);
  }
  await refresh();
}

async function startRecording() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    $("rec-note").textContent = "This browser allows the microphone only on https:// or localhost pages; upload a file instead.";
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false,
      noiseSuppression: false, autoGainControl: false } });
  } catch (err) {
    $("rec-note").textContent = `No microphone: ${err.message}`;
    return;
  }
  const context = new (window.AudioContext || window.webkitAudioContext)();
  const source = context.createMediaStreamSource(stream);
  const processor = context.createScriptProcessor(4096, 1, 1);
  const recorder = { stream, context, source, processor, chunks: [], frames: 0, rate: context.sampleRate };
  const limit = (studio.status && studio.status.limits.max_seconds) || 30;
  processor.onaudioprocess = (e) => {
    const input = e.inputBuffer.getChannelData(0);
    recorder.chunks.push(new Float32Array(input));
    recorder.frames += input.length;
    let peak = 0;
    for (let i = 0; i < input.length; i++) peak = Math.max(peak, Math.abs(input[i]));
    const db = 20 * Math.log10(Math.max(peak, 1e-5));
    const level = $("rec-level");
    level.style.width = `${Math.max(0, Math.min(100, (db + 60) / 60 * 100))}%`;
    level.dataset.peakDb = db.toFixed(1);
    level.className = db > -1 ? "level clip" : db > -9 ? "level hot" : "level"; // red near clipping, amber loud
    $("rec-time").textContent = `${(recorder.frames / recorder.rate).toFixed(1)} s`;
    if (recorder.frames / recorder.rate >= limit) stopRecording();
  };
  source.connect(processor);
  processor.connect(context.destination); // a processor only runs when connected; its output is silence
  studio.recorder = recorder;
  $("rec-start").disabled = true;
  $("rec-stop").disabled = false;
  $("rec-note").textContent = "Recording… speak now.";
}

function stopRecording() {
  const recorder = studio.recorder;
  if (!recorder) return;
  studio.recorder = null;
  recorder.processor.disconnect();
  recorder.source.disconnect();
  recorder.stream.getTracks().forEach((t) => t.stop());
  recorder.context.close();
  $("rec-start").disabled = false;
  $("rec-stop").disabled = true;
  $("rec-level").style.width = "0%";
  $("rec-note").textContent = `Recorded ${(recorder.frames / recorder.rate).toFixed(1)} s at ${recorder.rate} Hz.`;
  setAudio(encodeWav(recorder.chunks, recorder.frames, recorder.rate), "recording.wav");
}

function encodeWav(chunks, frames, rate) {
  const buffer = new ArrayBuffer(44 + frames * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + frames * 2, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, frames * 2, true);
  let offset = 44;
  for (const chunk of chunks) {
    for (let i = 0; i < chunk.length; i++, offset += 2) {
      const s = Math.max(-1, Math.min(1, chunk[i]));
      view.setInt16(offset, s < 0 ? s * 32768 : s * 32767, true);
    }
  }
  return new Blob([buffer], { type: "audio/wav" });
}

function selectTab(record) {
  $("tab-upload").setAttribute("aria-selected", String(!record));
  $("tab-record").setAttribute("aria-selected", String(record));
  $("pane-upload").hidden = record;
  $("pane-record").hidden = !record;
}

function init() {
  $("refresh").addEventListener("click", refresh);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    studio.token = $("token").value.trim();
    sessionStorage.setItem("studio-token", studio.token);
    $("token-box").hidden = true;
    notify("Token set for this browser tab.");
  });
  $("audition-form").addEventListener("submit", audition);
  $("audition-stop").addEventListener("click", stopAudition);
  $("tab-upload").addEventListener("click", () => selectTab(false));
  $("tab-record").addEventListener("click", () => selectTab(true));
  $("audio-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    setAudio(file || null, file ? file.name : "");
    if (file && !$("voice-name").value) {
      $("voice-name").value = file.name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9_.-]+/g, "_").replace(/^[._-]+/, "").slice(0, 64);
    }
  });
  $("rec-start").addEventListener("click", startRecording);
  $("rec-stop").addEventListener("click", stopRecording);
  for (const id of ["voice-name", "voice-language", "voice-description", "voice-transcript", "voice-replace"]) {
    $(id).addEventListener("input", invalidate);
    $(id).addEventListener("change", () => { if (studio.audio) checkVoice(); });
  }
  $("check").addEventListener("click", checkVoice);
  $("add-form").addEventListener("submit", saveVoice);
  $("edit-dialog").addEventListener("close", saveEdit);
  refresh();
}

document.addEventListener("DOMContentLoaded", init);
