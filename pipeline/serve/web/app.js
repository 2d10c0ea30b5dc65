// The search page: talks to the JSON API only (see /openapi.json); builds the DOM with
// textContent, never innerHTML, so captions and metadata cannot inject markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { columns: [], last: null, file: null, seq: 0 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

// ------------------------------------------------------------------ filters

function renderFilters(columns) {
  const form = $("filters");
  form.replaceChildren();
  const shown = columns.filter((c) => c.kind === "metadata" || c.filter !== "string");
  if (!shown.length) {
    form.append(el("p", { class: "hint", text: "This table has no metadata columns to filter on." }));
    return;
  }
  for (const column of shown) {
    const set = el("fieldset", { class: "filter", "data-column": column.name, "data-kind": column.filter });
    set.append(el("legend", { text: column.name }, el("small", { text: column.type })));
    if (column.filter === "string" && Array.isArray(column.values)) {
      const choices = el("div", { class: "choices" });
      for (const value of column.values) {
        const input = el("input", { type: "checkbox", value, name: `filter.${column.name}` });
        choices.append(el("label", { class: "choice" }, input, el("span", { text: value === "" ? "(empty)" : value })));
      }
      set.append(choices);
    } else if (column.filter === "string") {
      set.append(el("input", { type: "text", name: `filter.${column.name}`, placeholder: "exact value" }));
    } else if (column.filter === "boolean") {
      const select = el("select", { name: `filter.${column.name}` });
      for (const [value, label] of [["", "any"], ["true", "true"], ["false", "false"]]) {
        select.append(el("option", { value, text: label }));
      }
      set.append(select);
    } else {
      const step = column.filter === "integer" ? "1" : "any";
      const range = el("div", { class: "range" });
      range.append(
        el("input", { type: "number", step, name: `min.${column.name}`,
                      placeholder: column.min != null ? `≥ ${column.min}` : "min", title: "at least" }),
        el("input", { type: "number", step, name: `max.${column.name}`,
                      placeholder: column.max != null ? `≤ ${column.max}` : "max", title: "at most" }));
      set.append(range);
    }
    form.append(set);
  }
}

function filterParams() {
  const params = [];
  for (const input of $("filters").querySelectorAll("input, select")) {
    if (input.type === "checkbox") {
      if (input.checked) params.push([input.name, input.value]);
    } else if (input.value !== "") {
      params.push([input.name, input.value]);
    }
  }
  return params;
}

function restoreFilters(search) {
  for (const [key, value] of search) {
    if (!/^(filter|min|max)\./.test(key)) continue;
    for (const input of $("filters").querySelectorAll("input, select")) {
      if (input.name !== key) continue;
      if (input.type === "checkbox") { if (input.value === value) input.checked = true; }
      else input.value = value;
    }
  }
}

// ------------------------------------------------------------------ searching

function commonParams() {
  return [["k", $("k").value], ["against", $("against").value], ...filterParams()];
}

function setQueryImage(src, label) {
  $("query-image").hidden = !src;
  if (src) { $("preview").src = src; $("query-label").textContent = label; }
}

async function run(query) {
  if (!query) return;
  state.last = query;
  const seq = ++state.seq;
  const params = new URLSearchParams(commonParams());
  let request;
  if (query.mode === "text") {
    params.set("text", query.text);
    request = api(`/api/search?${params}`);
    history.replaceState(null, "", `?${params}`);
  } else if (query.mode === "image") {
    const form = new FormData();
    form.append("image", query.file, query.file.name || "upload");
    request = api(`/api/search/image?${params}`, { method: "POST", body: form });
  } else {
    request = api(`/api/similar/${encodeURIComponent(query.id)}?${params}`);
  }
  document.body.classList.add("loading");
  $("error").hidden = true;
  const started = performance.now();
  try {
    const result = await request;
    if (seq !== state.seq) return;  // a newer search answered first
    renderResults(result, performance.now() - started);
  } catch (error) {
    if (seq !== state.seq) return;
    $("error").textContent = error.message;
    $("error").hidden = false;
  } finally {
    if (seq === state.seq) document.body.classList.remove("loading");
  }
}

function renderResults(result, ms) {
  const grid = $("results");
  grid.replaceChildren();
  const metaColumns = state.columns.filter((c) => c.kind === "metadata").map((c) => c.name);
  result.hits.forEach((hit, i) => grid.append(card(hit, i + 1, metaColumns)));
  $("empty").hidden = result.hits.length > 0;
  const side = result.against === "text" ? "captions" : "images";
  $("status").textContent =
    `${result.count} result${result.count === 1 ? "" : "s"} · ranked against ${side} · ${Math.round(ms)} ms`;
  $("where").textContent = result.where ? `where ${result.where}` : "";
}

function card(hit, rank, metaColumns) {
  const img = el("img", { src: `${hit.thumbnail}?size=384`, alt: hit.caption || hit.id, decoding: "async" });
  const node = el("article", { class: "card", "data-id": hit.id, "data-score": String(hit.score) });
  img.addEventListener("error", () => node.classList.add("broken"));
  const thumb = el("div", { class: "thumb" }, img,
    el("span", { class: "score", title: "cosine similarity", text: hit.score.toFixed(3) }),
    el("span", { class: "rank", text: `#${rank}` }));
  if (hit.width && hit.height) thumb.title = `${hit.width} × ${hit.height}`;
  const caption = el("p", { class: hit.caption ? "caption" : "caption none", dir: "auto",
                            text: hit.caption || "no caption", title: hit.caption || "" });
  const meta = el("div", { class: "meta" });
  for (const name of metaColumns) {
    const value = hit.metadata[name];
    if (value === null || value === undefined) continue;
    meta.append(el("span", { class: "chip", "data-column": name, text: `${name}: ${value}` }));
  }
  const similar = el("button", { type: "button", class: "linkish similar", text: "Similar" });
  similar.addEventListener("click", () => {
    setQueryImage(`${hit.thumbnail}?size=96`, `like ${hit.id}`);
    run({ mode: "similar", id: hit.id });
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  const foot = el("div", { class: "foot" }, el("code", { text: hit.id, title: hit.image || "" }), similar);
  node.append(thumb, el("div", { class: "body" }, caption, meta, foot));
  return node;
}

function searchImage(file) {
  if (!file) return;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  setQueryImage(state.previewUrl, file.name || "uploaded image");
  $("q").value = "";
  run({ mode: "image", file });
}

// ------------------------------------------------------------------ wiring

async function init() {
  try {
    const [info, columns] = await Promise.all([api("/api/info"), api("/api/columns")]);
    $("info").textContent =
      `table ${info.table} · ${info.rows.toLocaleString()} rows · ${info.model} · ${info.dim}-d ${info.dtype}`;
    state.columns = columns.columns;
    renderFilters(state.columns);
  } catch (error) {
    $("error").textContent = `cannot load the table's description: ${error.message}`;
    $("error").hidden = false;
  }
  const search = new URLSearchParams(location.search);
  if (search.get("k")) $("k").value = search.get("k");
  if (search.get("against")) $("against").value = search.get("against");
  restoreFilters(search);
  document.body.dataset.ready = "true";
  if (search.get("text")) {
    $("q").value = search.get("text");
    run({ mode: "text", text: search.get("text") });
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("q").value.trim();
  if (!text) { $("q").focus(); return; }
  setQueryImage(null);
  run({ mode: "text", text });
});
$("file").addEventListener("change", () => searchImage($("file").files[0]));
$("clear-image").addEventListener("click", () => {
  setQueryImage(null);
  $("file").value = "";
  state.last = null;
});
$("filters").addEventListener("change", () => run(state.last));
$("filters").addEventListener("submit", (event) => { event.preventDefault(); run(state.last); });
$("clear-filters").addEventListener("click", () => { $("filters").reset(); run(state.last); });
$("against").addEventListener("change", () => run(state.last));
$("k").addEventListener("change", () => run(state.last));

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/"));
  searchImage(file);
});
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
});

init();
