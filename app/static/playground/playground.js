// sglora playground: plain browser JavaScript against the public API (no build step, no framework).
// It reads the routing `trace` of the JSON /generate-lora response generically: every per-expert list becomes a
// table column and every numeric one a bar series, so fields the server adds later appear without a change here.
// Its choices come from the server (the strategies of the OpenAPI document, the store's default from /experts),
// never from a list of its own. Each generation starts from a cleared view, so an error never leaves the last
// answer on screen as if it were the current one.
"use strict";

const API = new URL("../", window.location.href); // the API root, also behind a path prefix
const $ = (id) => document.getElementById(id);
const state = { adapterId: null, gated: null, description: null, files: [], urls: [], examples: [] };

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function call(path, options) {
  const response = await fetch(new URL(path, API), options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json() : await response.text();
  if (!response.ok) {
    const err = body && body.error ? body.error : null;
    const message = err ? `${err.message}${err.field ? ` (field: ${err.field})` : ""}`
                        : (body && body.detail ? JSON.stringify(body.detail) : String(body).slice(0, 300));
    throw new Error(`HTTP ${response.status}: ${message}`);
  }
  return body;
}

function showError(error) {
  $("error").hidden = !error;
  $("error").textContent = error ? String(error.message || error) : "";
}

function status(text) { $("status").textContent = text || ""; }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const fmt = (v) => {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(4);
  return v !== null && typeof v === "object" ? JSON.stringify(v) : String(v); // nested trace fields stay readable
};

// ------------------------------------------------------------------------------------------------ generate

function traceColumns(trace) {
  const n = Array.isArray(trace.expert_ids) ? trace.expert_ids.length : 0;
  const columns = Object.keys(trace).filter((k) => Array.isArray(trace[k]) && trace[k].length === n && n > 0);
  const scalars = Object.keys(trace).filter((k) => !columns.includes(k));
  return { n, columns, scalars };
}

function renderExperts(trace) {
  const { n, columns, scalars } = traceColumns(trace);
  const shown = columns.filter((c) => c !== "reasons"); // the reasons are sentences: a "why" line under each row
  const table = el("table", { id: "experts-table" });
  table.append(el("thead", {}, el("tr", {}, ...shown.map((c) => el("th", {}, c.replace(/_/g, " "))))));
  const body = el("tbody");
  for (let i = 0; i < n; i++) {
    body.append(el("tr", { class: "expert" }, ...shown.map((c) =>
      el("td", typeof trace[c][i] === "number" ? { class: "num" } : {}, fmt(trace[c][i])))));
    if (columns.includes("reasons")) {
      body.append(el("tr", { class: "why" }, el("td", { colspan: shown.length }, `why: ${trace.reasons[i]}`)));
    }
  }
  table.append(body);
  const box = $("experts");
  const routing = trace.routing ? [el("p", { class: "routing" }, `Chosen: ${trace.routing}.`)] : [];
  box.replaceChildren(el("h3", {}, `Experts chosen (${n})`), ...routing, table,
    ...scalars.filter((k) => k !== "routing")
      .map((k) => el("div", { class: "scalar" }, `${k.replace(/_/g, " ")}: ${fmt(trace[k])}`)));
  box.hidden = false;
  renderChart(trace, shown.filter((c) => trace[c].every((v) => typeof v === "number")));
}

function renderChart(trace, series) {
  // One horizontal bar group per expert, one bar per numeric series, scaled to that series' max |value|.
  const labels = (trace.descriptions || trace.expert_ids).map(String);
  const barH = 10, gap = 4, labelW = 230, plotW = 360;
  const groupH = series.length * (barH + 2) + gap * 2;
  const colors = ["#2452a8", "#2f9e6e", "#d9822b", "#8a3fb5", "#b3261e"];
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const height = labels.length * groupH + 24;
  svg.setAttribute("width", labelW + plotW + 80);
  svg.setAttribute("height", height);
  svg.setAttribute("role", "img");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  series.forEach((s, j) => {
    add("rect", { x: labelW + j * 130, y: 2, width: 10, height: 10, fill: colors[j % colors.length] });
    add("text", { x: labelW + j * 130 + 14, y: 11 }, s.replace(/_/g, " "));
  });
  labels.forEach((label, i) => {
    const y0 = 20 + i * groupH + gap;
    add("text", { x: 0, y: y0 + groupH / 2 }, label.length > 34 ? label.slice(0, 33) + "…" : label);
    series.forEach((s, j) => {
      const max = Math.max(...trace[s].map((v) => Math.abs(v)), 1e-12);
      const w = Math.max(1, (Math.abs(trace[s][i]) / max) * plotW);
      const y = y0 + j * (barH + 2);
      add("rect", { x: labelW, y, width: w, height: barH, fill: colors[j % colors.length], class: `bar ${s}` });
      add("text", { x: labelW + w + 4, y: y + barH - 1 }, fmt(trace[s][i]));
    });
  });
  $("chart").replaceChildren(el("h3", {}, "Routing"), svg);
  $("chart").hidden = false;
}

function renderCoverage(coverage) {
  const box = $("coverage");
  if (!coverage || coverage.max_similarity === null || coverage.max_similarity === undefined) {
    box.hidden = true;
    return;
  }
  const sim = coverage.max_similarity, threshold = coverage.threshold;
  const pct = (v) => `${Math.max(0, Math.min(1, v)) * 100}%`;
  const fill = el("div", { class: `fill${sim < threshold ? " low" : ""}`, style: `width:${pct(sim)}` });
  const mark = el("div", { class: "mark", style: `left:${pct(threshold)}`, title: `threshold ${threshold}` });
  box.replaceChildren(el("strong", {}, "Coverage "), el("span", { class: "gauge" }, fill, mark),
    ` best cosine to any library expert ${fmt(sim)} (warning below ${fmt(threshold)})`);
  if (coverage.warning) box.append(el("div", { class: "warning" }, coverage.warning));
  box.hidden = false;
}

function renderGated(result) {
  // The gate served the zero adapter: say so, and why, and offer the opt-out; no experts, weights or downloads.
  const retry = el("button", { type: "button", id: "ungate" }, "Generate the routed adapter anyway (gate off)");
  retry.addEventListener("click", () => generate(null, { gate: false }));
  $("gated").replaceChildren(el("strong", {}, "Zero-shot: "), `no adapter was applied. ${result.gated}.`,
    el("br"), retry);
  $("gated").hidden = false;
}

function renderDownloads(result) {
  const urls = result.downloads && Object.keys(result.downloads).length ? result.downloads
    : (result.download_url ? { safetensors: result.download_url } : {});
  const links = Object.entries(urls);
  $("downloads").replaceChildren("Download: ", ...(links.length ? links.flatMap(([name, url], i) =>
    [i ? " · " : "", el("a", { href: url, download: "", id: `download-${name}` }, name)])
    : ["not available (the server did not store this adapter)"]));
  $("downloads").hidden = false;
}

function renderRefinement(refinement) {
  // What the examples did, every field the server sends (loss before/after, steps, whether it stopped early, ...).
  if (!refinement) return;
  $("refinement").replaceChildren(el("h3", {}, "What the examples did"), ...Object.entries(refinement)
    .map(([k, v]) => el("div", { class: "scalar" }, `${k.replace(/_/g, " ")}: ${fmt(v)}`)));
  $("refinement").hidden = false;
}

function clearGeneration() {
  // Everything the last answer showed, and the adapter id ranking would use: an error must not leave them behind.
  state.adapterId = null;
  state.gated = null;
  for (const id of ["refinement", "coverage", "gated", "experts", "chart", "downloads"]) {
    $(id).hidden = true;
    $(id).replaceChildren();
  }
}

const dataUrl = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result); // "data:image/png;base64,...": the API accepts the prefix
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});

function setExamples(files) {
  state.examples.forEach((x) => URL.revokeObjectURL(x.url));
  state.examples = Array.from(files).filter((f) => f.type.startsWith("image/"))
    .map((file) => ({ file, url: URL.createObjectURL(file) }));
  $("example-list").replaceChildren(...state.examples.map((x, i) => el("figure", { class: "example" },
    el("img", { src: x.url, alt: x.file.name }),
    el("input", { type: "text", class: "example-caption", "aria-label": `caption of example ${i}`,
                  placeholder: `caption of ${x.file.name}` }))));
}

async function generationBody(overrides = {}) {
  // The request's fields from the form. Captions are sent as typed: the server says which one is missing.
  const body = { description: $("description").value.trim(), seed: Number($("seed").value || 0) };
  if ($("strategy").value) body.strategy = $("strategy").value;
  if ($("k").value) body.k = Number($("k").value);
  if (state.examples.length) {
    const captions = Array.from(document.querySelectorAll("#example-list .example-caption"), (c) => c.value.trim());
    body.examples = await Promise.all(state.examples.map(async (x, i) =>
      ({ image: await dataUrl(x.file), caption: captions[i] })));
  }
  return { ...body, ...overrides };
}

function showGeneration(result) {
  state.adapterId = result.adapter_id;
  state.gated = result.gated || null;
  renderRefinement(result.refinement);
  renderCoverage(result.coverage);
  if (result.gated) {
    renderGated(result);
    status(`zero-shot: the gate declined ${result.strategy} (no adapter applied)`);
    return;
  }
  if (result.trace) renderExperts(result.trace);
  else { $("experts").replaceChildren(el("p", {}, "zero_shot: no experts, no adapter")); $("experts").hidden = false; }
  renderDownloads(result);
  status(`adapter ${result.adapter_id.slice(0, 12)}… (${result.served || result.strategy}, cache ${result.cache})`);
}

async function generate(event, overrides = {}) {
  if (event) event.preventDefault();
  showError(null);
  clearGeneration();
  $("generate").disabled = true;
  status("generating…");
  try {
    const body = await generationBody(overrides);
    const result = await call("generate-lora", {
      method: "POST", body: JSON.stringify(body),
      headers: headers({ "Content-Type": "application/json", Accept: "application/json" }),
    });
    state.description = body.description;
    showGeneration(result);
  } catch (e) {
    showError(e);
    status("");
  } finally {
    $("generate").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------------ choices

async function loadStrategies() {
  // The server's list: the strategy enum of its OpenAPI document; its default from /experts, which needs the API
  // key when the server sets one (without it the menu just says "server default").
  const doc = await call("openapi.json", { headers: headers() });
  const schema = doc.components.schemas.GenerateRequest.properties.strategy;
  const names = (schema.enum || (schema.anyOf || []).flatMap((s) => s.enum || []));
  let serverDefault = "";
  try {
    serverDefault = (await call("experts?limit=1", { headers: headers() })).default_strategy || "";
  } catch (e) { /* no key yet: the label stays generic */ }
  const chosen = $("strategy").value;
  const label = serverDefault ? `server default (${serverDefault})` : "server default";
  $("strategy").replaceChildren(el("option", { value: "" }, label), ...names.map((n) => el("option", { value: n }, n)));
  if (names.includes(chosen)) $("strategy").value = chosen;
  $("strategy").dataset.loaded = "true";
}

// ------------------------------------------------------------------------------------------------ retrieve

function setFiles(files) {
  state.urls.forEach((u) => URL.revokeObjectURL(u));
  state.files = Array.from(files).filter((f) => f.type.startsWith("image/"));
  state.urls = state.files.map((f) => URL.createObjectURL(f));
  $("thumbs").replaceChildren(...state.files.map((f, i) =>
    el("figure", {}, el("img", { src: state.urls[i], alt: f.name }), el("figcaption", {}, `#${i} ${f.name}`))));
}

async function retrieveOnce(texts, withAdapter) {
  const form = new FormData();
  state.files.forEach((f) => form.append("images", f, f.name));
  texts.forEach((t) => form.append("texts", t));
  if (withAdapter) {
    if (state.adapterId) form.append("adapter_id", state.adapterId);
    else form.append("description", $("description").value.trim());
  }
  return call("retrieve", { method: "POST", body: form, headers: headers() });
}

function renderRanking(result, texts) {
  const thumb = (i) => el("span", { class: "rank" }, el("img", { src: state.urls[i], alt: `image ${i}` }), ` #${i}`);
  const perImage = el("table", { class: "image-to-text" }, el("tr", {}, el("th", {}, "image"),
    el("th", {}, "texts, best first")));
  for (const row of result.images) {
    const list = el("ol", {}, ...row.texts.map((t) => el("li", {}, `${texts[t.index]} `,
      el("span", { class: "score" }, `(${fmt(t.score)})`))));
    perImage.append(el("tr", { class: "ranked" }, el("td", {}, thumb(row.index)), el("td", {}, list)));
  }
  const perText = el("table", { class: "text-to-image" }, el("tr", {}, el("th", {}, "text"),
    el("th", {}, "images, best first")));
  for (const row of result.texts) {
    perText.append(el("tr", { class: "ranked" }, el("td", {}, texts[row.index]),
      el("td", {}, ...row.images.map((r) => el("span", {}, thumb(r.index), ` ${fmt(r.score)}  `)))));
  }
  const used = result.adapter || {};
  const note = el("p", { class: "adapter-used" }, used.source === "zero_shot" ? "no adapter"
    : used.gated || state.gated ? `zero-shot: the gate declined the adapter (${used.gated || state.gated})`
    : `adapter ${String(used.adapter_id || "").slice(0, 12)}… (${used.source})`);
  return [note, perImage, perText];
}

async function rank() {
  showError(null);
  const texts = $("texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
  if (!state.files.length || !texts.length) {
    showError("add at least one image and one text");
    return;
  }
  if (!state.adapterId && !$("description").value.trim()) {
    showError("type a task description (or generate an adapter) first");
    return;
  }
  $("rank").disabled = true;
  status("ranking…");
  try {
    const [base, adapted] = await Promise.all([retrieveOnce(texts, false), retrieveOnce(texts, true)]);
    $("rankings-base").replaceChildren(...renderRanking(base, texts));
    $("rankings-adapted").replaceChildren(...renderRanking(adapted, texts));
    $("rankings").hidden = false;
    status(`ranked ${state.files.length} images and ${texts.length} texts`);
  } catch (e) {
    showError(e);
    status("");
  } finally {
    $("rank").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------------ wiring

$("api-key").value = window.localStorage.getItem("sglora-api-key") || "";
$("api-key").addEventListener("change", () => {
  window.localStorage.setItem("sglora-api-key", $("api-key").value);
  loadStrategies().catch(showError);
});
$("generate-form").addEventListener("submit", (e) => generate(e));
$("description").addEventListener("input", () => { state.adapterId = null; state.gated = null; });
loadStrategies().catch(showError);
$("images").addEventListener("change", (e) => setFiles(e.target.files));
$("example-images").addEventListener("change", (e) => setExamples(e.target.files));
$("rank").addEventListener("click", rank);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setFiles(e.dataTransfer.files); });
