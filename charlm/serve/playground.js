// The playground page. It uses only the JSON API a script or curl would, and puts every piece of text
// a model wrote or scored into the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], running: [], run: null, runTimer: null };

function status(text) { $("status").textContent = text || ""; }
function fmt(x, digits) { return x === null || x === undefined ? "-" : Number(x).toFixed(digits); }
function count(n) { return n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"); }
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function api(path, body, signal) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  };
  const response = await fetch(path, init);
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// ---------------------------------------------------------------------------------------------- models

async function loadModels() {
  try {
    const data = await (await api("/api/models")).json();
    state.models = data.models;
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren();
    for (const m of data.models) {
      const option = el("option", "", m.name);
      option.value = m.name;
      select.appendChild(option);
    }
    if (chosen && data.models.some((m) => m.name === chosen)) select.value = chosen;
    describeModel();
    if (!data.models.length) status("No model yet: train one with `charlm train FILE`.");
  } catch (e) { status("Could not list the models: " + e.message); }
}

function currentModel() { return state.models.find((m) => m.name === $("model").value); }

function describeModel() {
  const m = currentModel();
  $("model-info").textContent = m ? `${m.cell.toUpperCase()} ${m.layers}x${m.hidden}, ${count(m.params)} parameters, ` +
    `vocab ${m.vocab}, trained on ${m.corpus || "?"} (${count(m.corpus_chars)} chars), ` +
    `validation ${fmt(m.val_bpc, 3)} bits/char` : "";
}

// ----------------------------------------------------------------------------------------------- write

function numberOrNull(id) { const v = $(id).value.trim(); return v === "" ? null : Number(v); }
function stopStrings() {  // "\n" and "\t" typed in the box stand for a newline and a tab
  const v = $("stop-at").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  return v === "" ? [] : [v];
}

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(event, data ? JSON.parse(data) : {});
    }
  }
}

async function writeOne(box, body, controller) {
  const pre = box.querySelector("pre"), out = box.querySelector(".generated"), stats = box.querySelector(".stats");
  try {
    const response = await api("/api/sample", body, controller.signal);
    await readEvents(response, (event, data) => {
      if (event === "chars") out.textContent += data.text;
      else if (event === "done") {
        stats.textContent = `${count(data.chars)} characters in ${fmt(data.seconds, 2)} s ` +
          `(${count(Math.round(data.chars_per_sec || 0))} chars/s, first after ${fmt((data.first_char_s || 0) * 1000, 0)} ms)` +
          (data.stopped !== "length" ? `, ${data.stopped}` : "");
      } else if (event === "error") { stats.replaceChildren(el("span", "error", data.error)); }
    });
  } catch (e) {
    if (e.name === "AbortError") stats.textContent = `stopped after ${count([...out.textContent].length)} characters`;
    else stats.replaceChildren(el("span", "error", e.message));
  }
  pre.scrollTop = pre.scrollHeight;
}

async function write() {
  const n = Math.max(1, Math.min(4, Number($("samples").value) || 1));
  const seed = $("seed").value, rng = numberOrNull("rng-seed");
  const outputs = $("outputs");
  outputs.replaceChildren();
  const controller = new AbortController();
  state.running.push(controller);
  $("stop").disabled = false; $("write-button").disabled = true;
  const jobs = [];
  for (let i = 0; i < n; i++) {
    const box = el("div", "sample");
    const pre = el("pre");
    pre.append(el("span", "seed-part", seed), el("span", "generated", ""));
    box.append(pre, el("div", "stats", "writing..."));
    outputs.appendChild(box);
    const body = {
      model: $("model").value, seed, length: Number($("length").value) || 500,
      temperature: Number($("temperature").value), top_k: numberOrNull("top-k"), top_p: numberOrNull("top-p"),
      rng_seed: rng === null ? null : rng + i, stop: stopStrings(),
    };
    jobs.push(writeOne(box, body, controller));
  }
  await Promise.all(jobs);
  state.running = state.running.filter((c) => c !== controller);
  $("stop").disabled = state.running.length === 0; $("write-button").disabled = false;
}

function stop() { for (const c of state.running) c.abort(); }

// ----------------------------------------------------------------------------------------------- score

function bandOf(bits, bands) { for (let i = 0; i < bands.length; i++) if (bits < bands[i]) return i; return bands.length; }
function shown(c) { return c === "\n" ? "\u21b5" : c === "\t" ? "\u21e5" : c === " " ? "\u2423" : c; }

function legend(scale) {
  const box = $("legend");
  box.replaceChildren(el("span", "muted", "bits per character: "));
  scale.bands.concat([null]).forEach((upper, i) => {
    const label = i === 0 ? `<${scale.bands[0]}` : upper === null ? `>=${scale.bands[i - 1]}` : `${scale.bands[i - 1]}-${upper}`;
    const sw = el("span", "sw", label);
    const [bg, fg] = scale.colors[i];
    if (bg) { sw.style.background = bg; sw.style.color = fg; }
    box.appendChild(sw);
  });
  const unknown = el("span", "sw", "unknown");
  unknown.style.background = scale.unknown[0]; unknown.style.color = scale.unknown[1];
  box.appendChild(unknown);
}

function showScore(data) {
  const figures = [
    ["model", data.model], ["characters scored", count(data.chars)],
    ["unknown (not scored)", count(data.unknown) + (data.unknown ? ` (${data.unknown_chars.join(" ")})` : "")],
    ["cross-entropy", fmt(data.cross_entropy, 4) + " nats/char"], ["perplexity", fmt(data.perplexity, 4)],
    ["bits/char", fmt(data.bpc, 4)],
  ];
  const table = $("figures");
  table.replaceChildren();
  for (const [k, v] of figures) {
    const tr = el("tr");
    tr.append(el("th", "", k), el("td", "", v));
    table.appendChild(tr);
  }
  legend(data.scale);
  const map = $("heatmap");
  map.replaceChildren();
  const chars = Array.from(data.text);
  const fragment = document.createDocumentFragment();
  chars.forEach((c, i) => {
    const span = el("span", c === "\n" ? "nl" : "", c === "\n" ? "\u21b5\n" : c);
    span.dataset.i = i;
    const bits = data.bits[i];
    const [bg, fg] = bits === null ? data.scale.unknown : data.scale.colors[bandOf(bits, data.scale.bands)];
    if (bg) { span.style.background = bg; span.style.color = fg; }
    fragment.appendChild(span);
  });
  map.appendChild(fragment);
  map.onmousemove = (event) => {
    const i = event.target.dataset ? event.target.dataset.i : undefined;
    const tip = $("tip");
    if (i === undefined) { tip.hidden = true; return; }
    const bits = data.bits[i];
    const lines = [`${JSON.stringify(chars[i])}: ` + (bits === null ? "not in the model's vocabulary" : `${bits.toFixed(2)} bits`)];
    for (const [g, p] of data.guesses[i] || []) lines.push(`  ${shown(g)}  ${(p * 100).toFixed(1)}%`);
    tip.textContent = lines.join("\n");
    tip.style.left = (event.clientX + 14) + "px"; tip.style.top = (event.clientY + 14) + "px";
    tip.hidden = false;
  };
  map.onmouseleave = () => { $("tip").hidden = true; };
}

async function score() {
  const text = $("score-text").value;
  if (!text) { status("Paste or drop a text to score."); return; }
  $("score-button").disabled = true;
  status("scoring...");
  try {
    showScore(await (await api("/api/score", { model: $("model").value, text })).json());
    status("");
  } catch (e) { status("Could not score: " + e.message); }
  $("score-button").disabled = false;
}

async function readFile(file) {
  if (!file) return;
  $("score-text").value = await file.text();
  score();
}

// ------------------------------------------------------------------------------------------------ runs

async function loadRuns() {
  try {
    const data = await (await api("/api/runs")).json();
    const list = $("run-list");
    list.replaceChildren();
    for (const run of data.runs) {
      const live = run.updated_s_ago < 120;
      const li = el("li", run.name === state.run ? "active" : "", run.name + (live ? "  (training)" : ""));
      li.onclick = () => { state.run = run.name; loadRuns(); };
      list.appendChild(li);
    }
    if (!state.run && data.runs.length) state.run = data.runs[0].name;
    if (!data.runs.length) $("run-info").textContent = "No metrics logs next to the checkpoints on offer.";
    if (state.run) await drawRun(state.run);
  } catch (e) { status("Could not list the runs: " + e.message); }
}

function svg(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function drawRun(name) {
  const data = await (await api(`/api/runs/${encodeURIComponent(name)}/metrics`)).json();
  const chart = $("curve");
  chart.replaceChildren();
  const all = data.train_bpc.concat(data.val_bpc);
  $("run-info").textContent = all.length
    ? `${name}: best validation ${fmt(data.best_val_bpc, 3)} bits/char; blue = training, orange = validation`
    : `${name}: nothing logged yet`;
  if (!all.length) return;
  const W = 720, H = 360, L = 50, B = 30, T = 10, R = 10;
  const xmax = Math.max(...all.map((p) => p[0])) || 1;
  const ys = all.map((p) => p[1]);
  const ymin = Math.max(0, Math.floor(Math.min(...ys) * 4) / 4), ymax = Math.ceil(Math.max(...ys) * 4) / 4 || 1;
  const x = (v) => L + (W - L - R) * v / xmax;
  const y = (v) => T + (H - T - B) * (1 - (v - ymin) / Math.max(1e-9, ymax - ymin));
  for (let i = 0; i <= 4; i++) {
    const v = ymin + (ymax - ymin) * i / 4;
    chart.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }), svg("text", { x: 4, y: y(v) + 4 }, v.toFixed(2)));
  }
  chart.append(svg("text", { x: W - R - 150, y: H - 8 }, `characters seen (max ${count(xmax)})`));
  for (const [series, cls] of [[data.train_bpc, "train"], [data.val_bpc, "val"]]) {
    if (series.length) chart.appendChild(svg("polyline", { class: cls, points: series.map((p) => `${x(p[0])},${y(p[1])}`).join(" ") }));
  }
}

// ----------------------------------------------------------------------------------------------- setup

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== name;
  clearInterval(state.runTimer);
  if (name === "runs") { loadRuns(); state.runTimer = setInterval(loadRuns, 5000); }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll(".tab")) tab.onclick = () => showTab(tab.dataset.tab);
  $("model").onchange = describeModel;
  $("temperature").oninput = () => { $("temperature-value").textContent = Number($("temperature").value).toFixed(2); };
  $("write-button").onclick = write;
  $("stop").onclick = stop;
  $("score-button").onclick = score;
  $("score-file").onchange = (e) => readFile(e.target.files[0]);
  const area = $("score-text");
  area.ondragover = (e) => e.preventDefault();
  area.ondrop = (e) => { e.preventDefault(); readFile(e.dataTransfer.files[0]); };
  loadModels();
});
