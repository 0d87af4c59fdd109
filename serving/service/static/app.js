// The remap search page: choose, drop or click an image, POST it to /v1/search, draw the grid.
"use strict";

const $ = (id) => document.getElementById(id);
let queryUrl = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// A sentence a person can act on, from the service's {"error", "detail"} answer.
function explain(status, body) {
  const detail = body && body.detail ? ` (${body.detail})` : "";
  const kind = body && body.error;
  if (kind === "not an image" || kind === "empty image") {
    return "That file is not an image the service can read: use a JPEG, PNG, GIF or BMP." + detail;
  }
  if (kind === "too many pixels") return "That image has too many pixels for this model." + detail;
  if (kind === "bad image") return "That image is damaged or truncated and could not be decoded." + detail;
  if (kind === "body too large") return "That file is too large to upload." + detail;
  if (status === 503) return "The model is not available right now; try again in a moment." + detail;
  return `The search failed (${status}${kind ? ": " + kind : ""}).` + detail;
}

function showQuery(blob, name) {
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(blob);
  $("query-image").src = queryUrl;
  $("query-name").textContent = name;
  $("query").hidden = false;
}

function drawResults(answer) {
  const grid = $("results");
  grid.replaceChildren();
  answer.results.forEach((hit, rank) => {
    const card = document.createElement("button");
    card.className = "hit";
    card.type = "button";
    card.dataset.id = hit.id;
    card.dataset.score = hit.score;
    card.title = `Search by ${hit.id}`;
    const img = document.createElement("img");
    img.src = hit.url;
    img.alt = hit.id;
    img.loading = "lazy";
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = `${rank + 1}. ${hit.id}`;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `score ${hit.score.toFixed(4)}`;
    card.append(img, id, score);
    card.addEventListener("click", () => searchByResult(hit));
    grid.append(card);
  });
  const t = answer.timing_ms;
  const qe = answer.qe ? ` · query expansion ${t.qe.toFixed(1)} ms` : "";
  $("timing").textContent =
    `${answer.results.length} results in ${t.total.toFixed(1)} ms: embedding ${t.embed.toFixed(1)} ms` +
    ` (batch of ${answer.batch_size}), search ${t.search.toFixed(1)} ms${qe}; ${answer.index_size} images indexed`;
  $("timing").hidden = false;
}

async function search(blob, name) {
  showError("");
  showQuery(blob, name);
  const form = new FormData();
  form.append("image", blob, name);
  form.append("k", $("k").value || "12");
  form.append("qe", $("qe").value);
  $("results").classList.add("busy");
  document.body.dataset.state = "searching";
  try {
    const response = await fetch("/v1/search", { method: "POST", body: form });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      $("results").replaceChildren();
      $("timing").hidden = true;
      showError(explain(response.status, body));
      return;
    }
    drawResults(body);
  } catch (_) {
    showError("The search service did not answer. Is it still running?");
  } finally {
    $("results").classList.remove("busy");
    document.body.dataset.state = "idle";
  }
}

async function searchByResult(hit) {
  try {
    const response = await fetch(hit.url);
    if (!response.ok) throw new Error(String(response.status));
    await search(await response.blob(), hit.id);
  } catch (_) {
    showError(`Could not load ${hit.id} from the service to search by it.`);
  }
}

function setUp() {
  const preview = $("query-image");
  preview.addEventListener("load", () => { preview.hidden = false; });
  preview.addEventListener("error", () => { preview.hidden = true; });  // not a picture
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) search(file, file.name);
    event.target.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) search(file, file.name);
  });
  fetch("/readyz").then((r) => r.json()).then((ready) => {
    $("status").textContent = ready.ready
      ? `${ready.index_size} images indexed`
      : `Not ready yet: ${ready.detail || "starting"}`;
  }).catch(() => { $("status").textContent = "The service did not answer."; });
  document.body.dataset.state = "idle";
}

setUp();
