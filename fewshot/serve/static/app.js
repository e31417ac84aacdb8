// fewshot's page: a thin client of the JSON API (the same endpoints as in the README's "Serve it").
"use strict";

const $ = (id) => document.getElementById(id);
const pending = { add: [], predict: [] };  // Files/Blobs chosen but not sent yet (add panel)
let shown = [];  // the files whose results are on screen: asked again after the classes change

// -- talking to the service -------------------------------------------------------------------
function headers() {
  const key = sessionStorage.getItem("fewshot-api-key");
  return key ? { "X-API-Key": key } : {};
}

async function api(method, url, body) {
  let response;
  try {
    response = await fetch(url, { method, body, headers: body && !(body instanceof FormData)
      ? { ...headers(), "Content-Type": "application/json" } : headers() });
  } catch (e) {
    throw new Error(`cannot reach the server (${e.message}); is fewshot serve still running?`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401 || response.status === 403) $("key-box").open = true;
    throw new Error((data && data.error) || `the server answered ${response.status}`);
  }
  return data;
}

function show(message, ok = false) {
  const box = $("status");
  box.textContent = message;
  box.className = ok ? "ok" : "";
  box.hidden = !message;
}

function classUrl(label, rest = "") {
  return `/v1/classes/${encodeURIComponent(label)}${rest}`;
}

async function busy(button, work) {
  button.disabled = true;
  try { await work(); } catch (e) { show(e.message); } finally { button.disabled = false; }
}

// -- classes ------------------------------------------------------------------------------------
async function loadClasses() {
  const classes = await api("GET", "/v1/classes");
  const list = $("class-list");
  list.replaceChildren(...classes.map(classItem));
  $("no-classes").hidden = classes.length > 0;
  $("class-count").textContent = classes.length ? `(${classes.length})` : "";
  for (const li of list.children) loadThumbnail(li);
}

// A class registered without a thumbnail (e.g. from the command line) keeps its placeholder.
async function loadThumbnail(li) {
  const response = await fetch(classUrl(li.dataset.label, "/thumbnail"), { headers: headers() });
  if (!response.ok) return;
  const img = document.createElement("img");
  img.alt = `thumbnail of ${li.dataset.label}`;
  img.src = URL.createObjectURL(await response.blob());
  li.querySelector(".noimg").replaceWith(img);
}

function classItem({ label, count }) {
  const li = document.createElement("li");
  li.className = "class";
  li.dataset.label = label;
  const placeholder = document.createElement("div");
  placeholder.className = "noimg";
  placeholder.setAttribute("aria-hidden", "true");
  placeholder.textContent = [...label.trim()][0] || "?";
  const text = document.createElement("div");
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = label;
  const n = document.createElement("div");
  n.className = "muted count";
  n.textContent = `${count} image${count === 1 ? "" : "s"}`;
  text.append(name, n);
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(
    button("Add images", "secondary", () => { $("add-label").value = label; $("add-label").focus(); }),
    button("Rename", "secondary", () => showRename(li, label)),
    button("Remove", "danger", (b) => confirmRemove(b, label)));
  li.append(placeholder, text, actions);
  return li;
}

function button(text, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  b.addEventListener("click", () => onClick(b));
  return b;
}

function showRename(li, label) {
  if (li.querySelector("form")) return;
  const form = document.createElement("form");
  const input = document.createElement("input");
  input.value = label;
  input.setAttribute("aria-label", `new name for ${label}`);
  input.required = true;
  const save = document.createElement("button");
  save.textContent = "Save";
  form.append(input, save, button("Cancel", "secondary", () => form.remove()));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(save, async () => {
      await api("POST", classUrl(label, "/rename"), JSON.stringify({ to: input.value }));
      show(`Renamed “${label}” to “${input.value}”.`, true);
      await loadClasses();
      await refreshResults();
    });
  });
  form.addEventListener("keydown", (event) => { if (event.key === "Escape") form.remove(); });
  li.append(form);
  input.focus();
  input.select();
}

function confirmRemove(b, label) {
  if (b.dataset.armed !== "yes") {  // two presses, so a slip of the finger removes nothing
    b.dataset.armed = "yes";
    b.textContent = "Really remove?";
    return;
  }
  busy(b, async () => {
    await api("DELETE", classUrl(label));
    show(`Removed “${label}”.`, true);
    await loadClasses();
    await refreshResults();
  });
}

async function addImages(event) {
  event.preventDefault();
  const label = $("add-label").value;
  if (!label.trim()) { show("Give the class a name first."); $("add-label").focus(); return; }
  if (!pending.add.length) { show("Choose, drop or take at least one photo of the class."); return; }
  await busy($("add-submit"), async () => {
    const form = new FormData();
    pending.add.forEach((file, i) => form.append("images", file, file.name || `photo-${i + 1}.jpg`));
    const report = await api("POST", classUrl(label, "/images"), form);
    const skipped = report.errors.length ? `\nSkipped ${report.errors.length}:\n${report.errors.join("\n")}` : "";
    const warnings = (report.warnings || []).length ? `\nWarning:\n${report.warnings.join("\n")}` : "";
    show(`Added ${report.added} image(s) to “${report.label}” (${report.total} in total).${skipped}${warnings}`,
         !report.errors.length && !(report.warnings || []).length);
    pending.add = [];
    renderPending();
    $("add-label").value = "";
    await loadClasses();
    await refreshResults();
  });
}

function renderPending() {
  $("add-pending").replaceChildren(...pending.add.map((file) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    img.alt = file.name || "photo";
    li.append(img);
    return li;
  }));
}

// -- predicting ---------------------------------------------------------------------------------
async function predict(files) {
  if (!files.length) return;
  try {
    await showResults(files);
    show("");
  } catch (e) {
    show(e.message);
  }
}

async function showResults(files) {
  const form = new FormData();
  files.forEach((file, i) => form.append("images", file, file.name || `photo-${i + 1}.jpg`));
  const topK = Math.max(1, Math.min(20, Number($("top-k").value) || 3));
  const predictions = await api("POST", `/v1/predict?top_k=${topK}`, form);
  $("results").replaceChildren(...predictions.map((p, i) => resultCard(p, files[i])));
  shown = files;
}

// After a class is added, renamed or removed, the answers on screen may name classes that are gone
// or miss a better one: ask again, or clear them when that fails (e.g. no classes left).
async function refreshResults() {
  if (!shown.length) return;
  try {
    await showResults(shown);
  } catch (e) {
    $("results").replaceChildren();
    shown = [];
  }
}

function resultCard(p, file) {
  const card = document.createElement("article");
  card.className = "result";
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file);
  img.alt = p.input;
  const body = document.createElement("div");
  const answer = document.createElement("p");
  const unknown = p.unknown !== undefined ? p.unknown : p.label === null;
  if (p.error) {
    answer.className = "answer error";
    answer.textContent = `Could not read this image: ${p.error}`;
    body.append(answer);
  } else {
    answer.className = unknown ? "answer unknown" : "answer";
    answer.textContent = unknown ? "Unknown: none of the classes" : p.label;
    body.append(answer);
    if (typeof p.similarity === "number") {
      const sim = document.createElement("p");
      sim.className = "similarity";
      sim.textContent = `similarity ${p.similarity.toFixed(3)}`;
      body.append(sim);
    }
    body.append(unknown ? nearest(p.top_k) : bars(p.top_k));
  }
  card.append(img, body);
  return card;
}

function bars(topK) {
  const list = document.createElement("ol");
  list.className = "bars";
  list.setAttribute("aria-label", "most likely classes");
  for (const entry of topK) {
    const li = document.createElement("li");
    li.className = "bar";
    const pct = `${(entry.score * 100).toFixed(1)}%`;
    const sim = typeof entry.similarity === "number" ? `, similarity ${entry.similarity.toFixed(3)}` : "";
    li.setAttribute("aria-label", `${entry.label}: ${pct}${sim}`);
    li.title = `${entry.label}: ${pct}${sim}`;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = pct;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = pct;
    li.append(label, track, value);
    list.append(li);
  }
  return list;
}

// An unknown answer has no class, so no class's probability is shown as if it were the answer:
// only how similar the nearest classes are (and that none is similar enough).
function nearest(topK) {
  const list = document.createElement("ol");
  list.className = "nearest";
  list.setAttribute("aria-label", "nearest classes, none close enough");
  for (const entry of topK) {
    const li = document.createElement("li");
    const sim = typeof entry.similarity === "number" ? entry.similarity.toFixed(3) : "?";
    li.textContent = `${entry.label}: similarity ${sim}`;
    list.append(li);
  }
  const box = document.createElement("div");
  const caption = document.createElement("p");
  caption.className = "muted nearest-caption";
  caption.textContent = "Nearest classes, none close enough:";
  box.append(caption, list);
  return box;
}

// -- files: picker, drag and drop, webcam -------------------------------------------------------
// The zone is a <label> around a visually hidden file input: clicking it, or Tab then Space/Enter on the
// input, opens the browser's own file picker; dropping files on it hands them over directly.
function wireDropzone(zone, input, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles([...e.dataTransfer.files]);
  });
  input.addEventListener("change", () => { onFiles([...input.files]); input.value = ""; });
}

let webcamTarget = null;

async function openWebcam(target) {
  webcamTarget = target;
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
    $("webcam-video").srcObject = stream;
    $("webcam").showModal();
  } catch (e) {
    show(`The camera is not available (${e.message}); choose files instead.`);
  }
}

function closeWebcam() {
  const stream = $("webcam-video").srcObject;
  if (stream) stream.getTracks().forEach((t) => t.stop());
  $("webcam-video").srcObject = null;
  $("webcam").close();
}

function capture() {
  const video = $("webcam-video");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => {
    const file = new File([blob], `webcam-${Date.now()}.jpg`, { type: "image/jpeg" });
    if (webcamTarget === "add") { pending.add.push(file); renderPending(); } else { predict([file]); }
    closeWebcam();
  }, "image/jpeg", 0.9);
}

// -- start --------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("fewshot-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("fewshot-api-key", $("api-key").value.trim());
    loadClasses().then(() => show("")).catch((e) => show(e.message));
  });
  wireDropzone($("add-drop"), $("add-files"), (files) => { pending.add.push(...files); renderPending(); });
  wireDropzone($("predict-drop"), $("predict-files"), predict);
  $("add-form").addEventListener("submit", addImages);
  const hasCamera = !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
  for (const b of document.querySelectorAll(".webcam-only")) {
    b.hidden = !hasCamera;
    b.addEventListener("click", () => openWebcam(b.dataset.webcam));
  }
  $("webcam-capture").addEventListener("click", capture);
  $("webcam-close").addEventListener("click", closeWebcam);
  $("webcam").addEventListener("cancel", closeWebcam);
  loadClasses().catch((e) => show(e.message));
});
