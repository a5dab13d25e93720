// The pages: each reads its state from the URL, asks /api for data and draws it.
import { fmt, heatmap, tokens, blue, svg, thumbnail } from "./plots.js";
import { el, link } from "./dom.js";
import { renderUnit, unitTitle } from "./unit_view.js";
import { graphPage } from "./graph.js";

const main = document.getElementById("main");
const params = new URLSearchParams(location.search);
if (params.has("token")) {           // the cookie holds the secret now: keep it out of sight
  params.delete("token");
  history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
}
const page = location.pathname.replace(/^\/+/, "").split("/")[0] || "model";
for (const a of document.querySelectorAll("nav a"))
  if (a.dataset.page === page) a.classList.add("active");

async function getJSON(url, options = {}) {
  const response = await fetch(url, { credentials: "same-origin", ...options });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function post(url, body) {
  return getJSON(url, { method: "POST", headers: { "X-Cloche-UI": "1",
    "Content-Type": "application/json" }, body: JSON.stringify(body ?? {}) });
}

function showError(where, error) {
  where.append(el("div", { class: "error", "data-testid": "error" }, String(error.message ?? error)));
}

function ready() { document.body.dataset.ready = "1"; }

// A streamed computation (JSON lines): a progress bar with a Cancel button, then the result.
async function stream(url, where) {
  const job = Math.random().toString(36).slice(2);
  const controller = new AbortController();
  const bar = el("progress", { max: 1, value: 0 });
  const label = el("span", { class: "muted" }, "starting…");
  // Set at the click: the server may end the stream (a "cancelled" line) before the POST answers.
  let cancelling = false;
  const cancel = el("button", { "data-testid": "cancel", onclick: async () => {
    cancelling = true;
    label.textContent = "cancelling…";
    try { await post(`/api/jobs/${job}/cancel`); } finally { controller.abort(); }
  } }, "Cancel");
  const box = el("div", { class: "progress", "data-testid": "progress" }, bar, label, cancel);
  where.append(box);
  try {
    const response = await fetch(`${url}&job=${job}`, { signal: controller.signal });
    if (!response.ok) throw new Error((await response.json()).error || response.statusText);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    reading: for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
        if (event.type === "progress") {
          bar.value = event.fraction ?? 0;
          label.textContent = event.total
            ? `${event.stage}: ${event.done}/${event.total} batches` : (event.stage ?? "");
        } else if (event.type === "result") { box.remove(); return event.data; }
        else if (event.type === "cancelled") { cancelling = true; break reading; }
        else if (event.type === "error") throw new Error(event.error);
      }
    }
    if (!cancelling) throw new Error("the computation stopped before its result");
  } catch (error) {
    if (!cancelling && !controller.signal.aborted) { box.remove(); throw error; }
  }
  box.remove();
  where.append(el("p", { class: "muted", "data-testid": "cancelled" }, "cancelled"));
  return null;
}

// ------------------------------------------------------------------------------------ Model
async function modelPage() {
  const data = await getJSON("/api/model");
  const info = data.info;
  main.replaceChildren(el("h1", {}, data.model));
  const sizes = [["family", info.family], ["layers", info.n_layers], ["heads", info.n_heads],
    ["kv heads", info.n_kv_heads], ["d_model", info.d_model], ["d_mlp", info.d_mlp],
    ["d_head", info.d_head], ["d_vocab", info.d_vocab], ["world size", info.world_size],
    ["device", info.device]];
  if (data.address) sizes.push(["server", data.address]);
  main.append(el("section", {}, el("table", { class: "grid", "data-testid": "model-info" },
    ...sizes.map(([k, v]) => el("tr", {}, el("th", { class: "left" }, k),
      el("td", { "data-key": k }, String(v)))))));
  const grids = el("div", { class: "heatmaps" });
  for (const [kind, values] of Object.entries(data.head_scores)) {
    const map = heatmap(values, { lo: 0, hi: 1, cell: 34, showValues: true,
      rowLabels: values.map((_, l) => `L${l}`), colLabels: values[0].map((_, h) => `H${h}`),
      link: (l, h) => link("head", { layer: l, head: h }),
      label: (l, h, v) => `${kind} L${l}H${h}: ${fmt(v, 4)}` });
    map.dataset.kind = kind;
    grids.append(el("div", { "data-testid": `scores-${kind}` },
      el("h3", {}, kind.replace("_", " ") + " score"), map));
  }
  main.append(el("section", {}, el("h2", {}, "Head scores"),
    el("p", { class: "muted" }, "Mean attention on the expected key over repeated random tokens;"
      + " click a head for its page."), grids));
  const dicts = data.dictionaries ?? [];
  if (dicts.length) {
    const cell = (v) => el("td", { class: "left" }, v == null ? "–" : String(v));
    main.append(el("section", {}, el("h2", {}, `Dictionaries (${dicts.length})`),
      el("p", { class: "muted" }, "Click a dictionary for the page of its feature 0."),
      el("table", { class: "grid", "data-testid": "dictionaries" },
        el("tr", {}, ...["name", "point", "d_sae", "architecture", "k"].map((h) =>
          el("th", { class: "left" }, h))),
        ...dicts.map((d) => el("tr", { "data-dictionary": d.name, "data-point": d.point,
          "data-d-sae": d.d_dict, "data-architecture": d.architecture },
          el("td", { class: "left" }, el("a", { href: link("unit",
            { point: `dict:${d.name}:features`, unit: 0 }) }, d.name)),
          cell(d.out_point ? `${d.point} → ${d.out_point}` : d.point), cell(d.d_dict),
          cell(d.architecture), cell(d.k))))));
  }
  const unitPoints = data.points.filter((p) => p.shape && p.shape[0] === "batch" && p.shape[1] === "seq");
  const row = (p) => el("tr", { "data-point": p.name },
    el("td", { class: "left" }, unitPoints.includes(p)
      ? el("a", { href: link("unit", { point: p.name, unit: 0 }) }, p.name) : p.name),
    el("td", { class: "left" }, p.kind), el("td", { class: "left" },
      p.shape ? "(" + p.shape.join(", ") + ")" : "?"));
  const header = () => el("tr", {}, el("th", { class: "left" }, "point"),
    el("th", { class: "left" }, "kind"), el("th", { class: "left" }, "shape"));
  const canonical = data.points.filter((p) => p.kind !== "module");
  const modules = data.points.filter((p) => p.kind === "module");
  main.append(el("section", {}, el("h2", {}, `Probe points (${data.points.length})`),
    el("p", { class: "muted" }, "Click a point for the page of its unit 0."),
    el("table", { class: "grid", "data-testid": "points" }, header(), ...canonical.map(row)),
    el("details", {}, el("summary", {}, `${modules.length} module inputs and outputs`),
      el("table", { class: "grid", "data-testid": "module-points" }, header(), ...modules.map(row)))));
  ready();
}

// ------------------------------------------------------------------------------------ Unit
function unitForm(q) {
  const field = (name, label, attrs = {}) => el("label", {}, label,
    el("input", { name, value: q.get(name) ?? "", ...attrs }));
  return el("form", { class: "controls", method: "get", action: "/unit" },
    field("point", "probe point", { size: 24, list: "points", required: "" }),
    field("unit", "unit (index)", { type: "number", min: 0 }),
    field("direction", "or direction (floats)", { size: 18 }),
    field("dataset", "dataset", { size: 16, placeholder: "default:heldout" }),
    field("limit", "examples", { type: "number", min: 1, placeholder: "512" }),
    el("button", { class: "primary", type: "submit" }, "Show"));
}

async function unitPage() {
  const q = params;
  main.replaceChildren(el("h1", {}, "Unit"), el("section", {}, unitForm(q)));
  const model = getJSON("/api/model").then((m) => {
    const list = el("datalist", { id: "points" });
    for (const p of m.points) if (p.shape && p.shape[1] === "seq") list.append(el("option", { value: p.name }));
    main.append(list);
  }).catch(() => {});
  if (!q.get("point")) {
    main.append(el("p", { class: "muted" }, "Choose a probe point and a unit (or a direction)."));
    await model;
    ready();
    return;
  }
  const api = "/api/unit?" + new URLSearchParams([...q].filter(([k]) => k !== "job"));
  const body = el("div");
  main.append(body);
  const data = await stream(api, body);
  if (!data) { ready(); return; }
  main.querySelector("h1").textContent = unitTitle(data);
  const exportQuery = new URLSearchParams([...q].filter(([k]) => ["point", "unit", "direction",
    "dataset", "limit"].includes(k)));
  body.append(el("p", {}, el("a", { href: "/api/unit/export?" + exportQuery, download: "",
    "data-testid": "export" }, "Export as one HTML file")));
  const scale = renderUnit(body, data, { dataset: q.get("dataset"), limit: q.get("limit") });
  const textBox = el("textarea", { "data-testid": "try-text", placeholder: "type text here" },
    q.get("text") ?? "");
  const out = el("div", { "data-testid": "try-result" });
  const run = async () => {
    out.replaceChildren(el("span", { class: "muted" }, "running…"));
    const tq = new URLSearchParams({ point: data.point, text: textBox.value });
    if (q.get("unit")) tq.set("unit", q.get("unit")); else tq.set("direction", q.get("direction"));
    try {
      const r = await getJSON("/api/unit/tokens?" + tq);
      out.replaceChildren(tokens(r.tokens, r.values, { scale }));
    } catch (error) { out.replaceChildren(); showError(out, error); }
    out.dataset.done = "1";
  };
  body.append(el("section", {}, el("h2", {}, "Test your own text"), textBox,
    el("button", { class: "primary", "data-testid": "try-run", onclick: run }, "Run"), out));
  ready();  // the form's list of points fills in when it comes
}

// ------------------------------------------------------------------------------------ Text
function selectHead(data, layer, head, box) {
  const pattern = data.attention[layer][head];
  const labels = data.tokens.map((t) => JSON.stringify(t).slice(1, -1).slice(0, 8));
  const map = heatmap(pattern, { lo: 0, hi: 1, cell: Math.max(8, Math.min(22, 520 / labels.length)),
    rowLabels: labels, colLabels: labels, left: 70, top: 60, rotate: true,
    label: (r, c, v) => `query ${r} ${JSON.stringify(data.tokens[r])} → key ${c} `
      + `${JSON.stringify(data.tokens[c])}: ${fmt(v, 4)}` });
  map.dataset.layer = layer;
  map.dataset.head = head;
  box.replaceChildren(el("h3", {}, `L${layer}H${head} `, el("a", { href: link("head", {
    layer, head, text: params.get("text") }) }, "head page")), map);
}

async function textPage() {
  const text = params.get("text") ?? "";
  const area = el("textarea", { name: "text", "data-testid": "text-input" }, text);
  main.replaceChildren(el("h1", {}, "Text"), el("section", {},
    el("form", { method: "get", action: "/text" }, area,
      el("button", { class: "primary", type: "submit" }, "Analyse"))));
  if (!text) { ready(); return; }
  const data = await getJSON("/api/text?" + new URLSearchParams({ text }));
  const loss = [null, ...data.loss];
  const lossBox = tokens(data.tokens, loss, { breaks: true, scale: Math.max(...data.loss, 1e-9),
    colour: (v, s) => (v == null ? "transparent" : `rgba(220,38,38,${(0.8 * v / s).toFixed(3)})`),
    extra: (i) => (i ? ` (loss of predicting it)` : " (first token: no loss)") });
  lossBox.dataset.testid = "loss-tokens";
  main.append(el("section", {}, el("h2", {}, "Loss per token"),
    el("p", { class: "stats" }, el("span", { "data-testid": "mean-loss", "data-value": data.mean_loss },
      el("b", {}, "mean loss "), fmt(data.mean_loss))), lossBox));
  const lens = el("table", { class: "grid lens", "data-testid": "lens" },
    el("tr", {}, el("th", {}, "layer"), ...data.tokens.map((t) => el("th", { class: "left" },
      JSON.stringify(t)))));
  data.lens.top_tokens.forEach((layer, l) => {
    lens.append(el("tr", { "data-layer": l }, el("th", {}, String(l)),
      ...layer.map((top, pos) => {
        const p = Math.exp(data.lens.logprobs[l][pos][0]);
        return el("td", { style: `background:${blue(p)}`, "data-top": top[0], "data-pos": pos,
          title: top.map((t, i) => `${JSON.stringify(t)} ${fmt(Math.exp(data.lens.logprobs[l][pos][i]))}`).join("\n") },
          JSON.stringify(top[0]));
      })));
  });
  main.append(el("section", {}, el("h2", {}, "Logit lens (top next token per layer, shaded by"
    + " probability; hover for the top 5)"), el("div", { style: "overflow-x:auto" }, lens)));
  const big = el("div", { "data-testid": "attention-big" });
  const thumbs = el("div", { class: "thumbs", "data-testid": "attention-thumbs" });
  const [sl, sh] = (params.get("head") ?? "0.0").split(".").map(Number);
  data.attention.forEach((heads, l) => heads.forEach((pattern, h) => {
    const t = el("div", { class: "thumb" + (l === sl && h === sh ? " selected" : ""),
      "data-layer": l, "data-head": h, onclick: () => {
        for (const x of thumbs.children) x.classList.remove("selected");
        t.classList.add("selected");
        params.set("head", `${l}.${h}`);
        history.replaceState(null, "", location.pathname + "?" + params);
        selectHead(data, l, h, big);
      } }, thumbnail(pattern, { cell: Math.max(1, Math.min(6, Math.round(96 / pattern.length))) }),
      el("div", {}, `L${l}H${h}`));
    thumbs.append(t);
  }));
  selectHead(data, sl || 0, sh || 0, big);
  main.append(el("section", {}, el("h2", {}, "Attention (every head; click one)"), thumbs, big));
  ready();
}

async function notYet() {
  main.replaceChildren(el("h1", {}, page), el("p", { class: "muted" }, "There is no such page."));
  ready();
}

// ------------------------------------------------------------------------------------ Intervene
function distribution(side, testid) {
  return el("table", { class: "grid list", "data-testid": testid },
    el("tr", {}, el("th", { class: "left" }, "token"), el("th", {}, "p"), el("th", {}, "other run")),
    ...side.top.map((r) => el("tr", { "data-token": r.token, "data-p": r.p },
      el("td", { class: "left" }, JSON.stringify(r.token)),
      el("td", { class: "val", style: `background:${blue(r.p)}` }, fmt(r.p)),
      el("td", { class: "val muted" }, fmt(r.p_other)))));
}

async function intervenePage() {
  const q = params;
  const field = (name, label, attrs = {}) => el("label", {}, label,
    el("input", { name, value: q.get(name) ?? attrs.value ?? "", ...attrs }));
  const op = el("select", { name: "op" }, ...["zero", "scale", "steer"].map((o) =>
    el("option", { value: o, ...(q.get("op") === o ? { selected: "" } : {}) }, o)));
  main.replaceChildren(el("h1", {}, "Intervene"), el("section", {},
    el("form", { class: "controls", method: "get", action: "/intervene" },
      el("label", { style: "flex-basis:100%" }, "prompt",
        el("textarea", { name: "text", "data-testid": "prompt" }, q.get("text") ?? "")),
      field("point", "probe point", { size: 22, required: "" }),
      field("unit", "unit", { type: "number", min: 0 }), field("head", "or head", { type: "number", min: 0 }),
      field("direction", "or direction (floats)", { size: 14 }),
      el("label", {}, "operation", op), field("factor", "factor", { size: 6, value: "0" }),
      field("max_new_tokens", "new tokens", { type: "number", min: 1, max: 40, value: "20" }),
      el("button", { class: "primary", type: "submit" }, "Run both"))));
  if (!q.get("text") || !q.get("point")) {
    main.append(el("p", { class: "muted" }, "Type a prompt, choose what to change and how."));
    ready();
    return;
  }
  const data = await getJSON("/api/intervene?" + q);
  main.append(el("section", {}, el("p", { class: "stats" },
    el("span", { "data-testid": "edit" }, el("b", {}, "edit "), data.edit),
    el("span", { "data-testid": "kl", "data-value": data.kl }, el("b", {}, "KL(clean ‖ edited) "), fmt(data.kl, 4))),
    el("div", { class: "side-by-side" },
      el("div", {}, el("h2", {}, "Clean"), distribution(data.clean, "clean-top"),
        el("h3", {}, "continuation"), el("pre", { class: "tokens", "data-testid": "clean-text" },
          data.clean.continuation)),
      el("div", {}, el("h2", {}, "Edited"), distribution(data.edited, "edited-top"),
        el("h3", {}, "continuation"), el("pre", { class: "tokens", "data-testid": "edited-text" },
          data.edited.continuation)))));
  ready();
}

// ------------------------------------------------------------------------------------ Save contexts
function sizeOf(n) {
  return n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`;
}

async function contextsPage() {
  const q = params;
  main.replaceChildren(el("h1", {}, "Save contexts"));
  const data = await getJSON("/api/contexts");
  if (!data.contexts.length) main.append(el("p", { class: "muted", "data-testid": "no-contexts" },
    "This session has no save contexts yet: probes fill them with ctx.save(...) or ctx.reduce(...)."));
  const empty = data.contexts.filter((c) => !c.keys.length && !c.reducers.length);
  for (const c of data.contexts.filter((c) => c.keys.length || c.reducers.length)) {
    const clear = el("button", { "data-testid": `clear-${c.name}`, onclick: async () => {
      await post("/api/contexts/clear", { name: c.name });
      location.reload();
    } }, "Clear");
    main.append(el("section", { "data-context": c.name },
      el("h2", {}, c.name, " ", clear),
      el("p", { class: "muted" }, `${c.runs} run(s), ${sizeOf(c.nbytes)}`
        + (c.reducers.length ? `; reducers: ${c.reducers.join(", ")}` : "")),
      el("table", { class: "grid" }, el("tr", {}, ...["key", "entries", "entry shape", "dtype", "size", ""]
        .map((h) => el("th", { class: "left" }, h))),
        ...c.keys.map((k) => el("tr", { "data-key": k.key, "data-entries": k.entries,
          "data-shape": JSON.stringify(k.shape) },
          el("td", { class: "left" }, k.key), el("td", {}, String(k.entries)),
          el("td", { class: "left" }, `(${k.shape.join(", ")})` + (k.same_shape ? "" : " …")),
          el("td", { class: "left" }, k.dtype), el("td", {}, sizeOf(k.bytes)),
          el("td", {}, el("a", { href: link("contexts", { name: c.name, key: k.key,
            index: k.shape.length > 1 ? "0" + ", 0".repeat(k.shape.length - 2) : "" }) }, "view")))))));
  }
  if (empty.length) main.append(el("p", { class: "muted", "data-testid": "empty-contexts" },
    "Empty (runs committed, nothing saved): " + empty.map((c) => `${c.name} (${c.runs} runs)`).join(", ")));
  if (!q.get("name") || !q.get("key")) { ready(); return; }
  const form = el("form", { class: "controls", method: "get", action: "/contexts" },
    el("input", { type: "hidden", name: "name", value: q.get("name") }),
    el("input", { type: "hidden", name: "key", value: q.get("key") }),
    el("label", {}, "slice (entries first; ints and a:b, e.g. 0, :, 0:16)",
      el("input", { name: "index", value: q.get("index") ?? "", size: 24 })),
    el("button", { class: "primary", type: "submit" }, "Fetch"));
  const box = el("section", { "data-testid": "slice" }, el("h2", {}, `${q.get("name")}[${q.get("key")}]`), form);
  main.append(box);
  try {
    const s = await getJSON("/api/contexts/slice?" + new URLSearchParams({ name: q.get("name"),
      key: q.get("key"), index: q.get("index") ?? "" }));
    box.append(el("p", { class: "muted" }, `shape (${s.shape.join(", ")})`));
    if (s.values.length > 1 && s.values[0].length > 1) box.append(heatmap(s.values, { signed: true,
      cell: Math.max(4, Math.min(22, 900 / s.values[0].length)),
      lo: Math.min(...s.values.flat()), hi: Math.max(...s.values.flat()) }));
    const shown = s.values.slice(0, 64);
    box.append(el("div", { style: "overflow-x:auto" }, el("table", { class: "grid", "data-testid": "slice-table" },
      ...shown.map((row, r) => el("tr", {}, el("th", {}, String(r)),
        ...row.slice(0, 64).map((v) => el("td", { "data-value": v }, fmt(v, 4))))))));
  } catch (error) { showError(box, error); }
  ready();
}

// ------------------------------------------------------------------------------------ Head
function eigenPlot(eig) {
  const size = 180, r = Math.max(1e-9, ...eig.map(([a, b]) => Math.hypot(a, b)));
  const scale = (size / 2 - 10) / r;
  const root = svg("svg", { width: size, height: size, class: "eigen" });
  root.append(svg("line", { x1: 0, x2: size, y1: size / 2, y2: size / 2, stroke: "#ccc" }),
    svg("line", { x1: size / 2, x2: size / 2, y1: 0, y2: size, stroke: "#ccc" }));
  for (const [a, b] of eig) root.append(svg("circle", { cx: size / 2 + a * scale,
    cy: size / 2 - b * scale, r: 3, fill: a >= 0 ? "rgb(234,88,12)" : "rgb(37,99,235)" },
    svg("title", {}, `${fmt(a)} ${b >= 0 ? "+" : "−"} ${fmt(Math.abs(b))}i`)));
  return root;
}

function circuit(name, c, testid) {
  return el("div", { "data-testid": testid, "data-positive": c.positive_fraction },
    el("h3", {}, `${name}: positive eigenvalue share ${fmt(c.positive_fraction)}`),
    eigenPlot(c.eigenvalues),
    el("table", { class: "grid list" }, el("tr", {}, el("th", { class: "left" }, name === "OV" ? "source" : "query"),
      el("th", { class: "left" }, name === "OV" ? "promotes" : "attends to"), el("th", {}, "value")),
      ...c.pairs.map((p) => el("tr", {}, el("td", { class: "left" }, JSON.stringify(p.source)),
        el("td", { class: "left" }, JSON.stringify(p.target)), el("td", { class: "val" }, fmt(p.value))))));
}

async function headPage() {
  const q = params;
  const layer = q.get("layer"), head = q.get("head");
  main.replaceChildren(el("h1", {}, layer != null && head != null ? `Head L${layer}H${head}` : "Head"),
    el("section", {}, el("form", { class: "controls", method: "get", action: "/head" },
      el("label", {}, "layer", el("input", { name: "layer", type: "number", min: 0, value: layer ?? "0" })),
      el("label", {}, "head", el("input", { name: "head", type: "number", min: 0, value: head ?? "0" })),
      el("label", { style: "flex:1" }, "text (empty: a repeated snippet)",
        el("textarea", { name: "text", rows: 2 }, q.get("text") ?? "")),
      el("button", { class: "primary", type: "submit" }, "Show"))));
  if (layer == null || head == null) { ready(); return; }
  const base = { layer, head };
  const [pattern, circuits] = await Promise.all([
    getJSON("/api/head/pattern?" + new URLSearchParams({ ...base, text: q.get("text") ?? "" })),
    getJSON("/api/head/circuits?" + new URLSearchParams(base))]);
  const labels = pattern.tokens.map((t) => JSON.stringify(t).slice(1, -1).slice(0, 8));
  const map = heatmap(pattern.pattern, { lo: 0, hi: 1, rowLabels: labels, colLabels: labels,
    cell: Math.max(8, Math.min(22, 620 / labels.length)), left: 70, top: 60, rotate: true,
    label: (r, c, v) => `query ${r} ${JSON.stringify(pattern.tokens[r])} → key ${c} ${JSON.stringify(pattern.tokens[c])}: ${fmt(v, 4)}` });
  main.append(el("section", { "data-testid": "head-pattern" }, el("h2", {}, "Attention pattern"),
    el("p", { class: "muted" }, "rows: queries, columns: keys; hover for values"), map));
  main.append(el("section", {}, el("h2", {}, "Circuits (eigenvalues and top token pairs)"),
    el("div", { class: "row" }, circuit("OV", circuits.ov, "ov"), circuit("QK", circuits.qk, "qk"))));
  const ablation = el("section", { "data-testid": "ablation" }, el("h2", {}, "Zero-ablation"));
  main.append(ablation);
  const extra = new URLSearchParams(base);
  for (const k of ["dataset", "limit"]) if (q.get(k)) extra.set(k, q.get(k));
  const a = await stream("/api/head/ablation?" + extra, ablation);
  if (a) {
    const row = (name, r, key) => el("tr", { "data-which": key, "data-clean": r.clean, "data-ablated": r.ablated },
      el("th", { class: "left" }, name), el("td", {}, fmt(r.clean)), el("td", {}, fmt(r.ablated)),
      el("td", {}, (r.ablated >= r.clean ? "+" : "") + fmt(r.ablated - r.clean)));
    ablation.append(el("table", { class: "grid" }, el("tr", {}, el("th", {}, ""), el("th", {}, "clean loss"),
      el("th", {}, "ablated"), el("th", {}, "change")),
      row(`held-out text (${a.heldout.dataset}, ${a.heldout.limit} examples)`, a.heldout, "heldout"),
      row(`repeated random tokens (second copy of ${a.repeated.half})`, a.repeated, "repeated")));
  }
  ready();
}

const PAGES = { model: modelPage, unit: unitPage, text: textPage, intervene: intervenePage,
  contexts: contextsPage, head: headPage, graph: () => graphPage(main, params, { getJSON, ready }) };
(PAGES[page] ?? notYet)().catch((error) => { showError(main, error); ready(); });
