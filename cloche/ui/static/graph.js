// The Graph page: the pruned attribution graph of one prompt, drawn as SVG.
// Rows: token embeddings at the bottom, then each dictionary in forward order, the logit on
// top; columns: positions. Edges are coloured by sign (orange +, blue −), their width by
// |weight|; a feature links to its unit page. The JSON is the AttributionGraph document.
import { fmt, svg } from "./plots.js";
import { el, link } from "./dom.js";

const POS = "rgb(234,88,12)", NEG = "rgb(37,99,235)";
const KEYS = ["prompt", "target", "keep", "edge_keep", "max_nodes"];

function layout(graph) {
  const rows = 2 + Object.keys(graph.dictionaries).length;
  const seq = graph.tokens.length;
  const cells = new Map();
  for (const n of graph.nodes) {
    const key = `${n.row}:${n.position}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  // each position as wide as its most crowded row needs
  const widths = Array.from({ length: seq }, () => 56);
  for (const nodes of cells.values()) {
    const pos = nodes[0].position;
    widths[pos] = Math.max(widths[pos], 16 * nodes.length + 16);
  }
  const rowH = 96, left = 170, top = 30;
  const starts = widths.map((_, i) => left + widths.slice(0, i).reduce((a, b) => a + b, 0));
  const at = new Map();
  for (const nodes of cells.values()) nodes.forEach((n, k) => at.set(n.id, {
    x: starts[n.position] + widths[n.position] / 2 + (k - (nodes.length - 1) / 2) * 16,
    y: top + (rows - 1 - n.row) * rowH }));
  const width = left + widths.reduce((a, b) => a + b, 0) + 20;
  return { rows, seq, rowH, left, top, at, width, height: top + (rows - 1) * rowH + 60 };
}

function nodeShape(n, p, graph) {
  const title = svg("title", {}, n.kind === "feature"
    ? `${n.label} at position ${n.position}: activation ${fmt(n.activation, 4)}`
      + `, influence ${fmt(n.influence, 4)}`
    : n.kind === "error" ? `${n.label} at position ${n.position}: norm ${fmt(n.activation, 4)}`
    : n.kind === "token" ? `token ${n.position}: ${JSON.stringify(n.label)}`
    : `logit of ${JSON.stringify(n.label)}: ${fmt(n.value, 4)}`);
  const common = { class: `node ${n.kind}`, "data-id": n.id, "data-kind": n.kind };
  if (n.kind === "feature") {
    const shape = svg("circle", { ...common, cx: p.x, cy: p.y, r: 6, fill: "#f59e0b",
      stroke: "#92400e" }, title);
    return svg("a", { href: link("unit", { point: `dict:${n.dictionary}:features`, unit: n.feature }),
      "data-testid": "feature-link" }, shape);
  }
  if (n.kind === "error")
    return svg("rect", { ...common, x: p.x - 5, y: p.y - 5, width: 10, height: 10,
      fill: "#9ca3af", stroke: "#4b5563" }, title);
  if (n.kind === "token")
    return svg("g", common, svg("rect", { x: p.x - 6, y: p.y - 6, width: 12, height: 12,
      fill: "#e5e7eb", stroke: "#6b7280" }), svg("text", { x: p.x, y: p.y + 22,
      "text-anchor": "middle" }, JSON.stringify(n.label).slice(1, -1).slice(0, 10)), title);
  return svg("g", common, svg("rect", { x: p.x - 8, y: p.y - 8, width: 16, height: 16, rx: 4,
    fill: "#10b981", stroke: "#065f46" }), svg("text", { x: p.x + 14, y: p.y + 4 },
    `${JSON.stringify(graph.target.token)} (${fmt(graph.target.probability)})`), title);
}

export function drawGraph(graph) {
  const L = layout(graph);
  const root = svg("svg", { width: L.width, height: L.height, class: "attribution-graph",
    "data-testid": "graph" });
  const names = Object.entries(graph.dictionaries).sort((a, b) => a[1].row - b[1].row);
  const labels = ["tokens", ...names.map(([name, d]) => `${name} (${d.point})`), "logit"];
  labels.forEach((label, row) => {
    const y = L.top + (L.rows - 1 - row) * L.rowH;
    root.append(svg("line", { x1: L.left - 10, x2: L.width - 10, y1: y, y2: y,
      stroke: "#eee" }), svg("text", { x: 6, y: y + 4, class: "row-label" }, label.slice(0, 24)));
  });
  const edges = graph.edges;
  const biggest = Math.max(1e-12, ...edges.map((e) => Math.abs(e.weight)));
  const lines = svg("g", { class: "edges" });
  // smallest first, so the strongest edges are drawn on top
  for (const e of [...edges].sort((a, b) => Math.abs(a.weight) - Math.abs(b.weight))) {
    const s = L.at.get(e.source), t = L.at.get(e.target);
    const width = 0.5 + 4.5 * Math.abs(e.weight) / biggest;
    lines.append(svg("line", { class: `edge ${e.weight >= 0 ? "pos" : "neg"}`, x1: s.x, y1: s.y,
      x2: t.x, y2: t.y, stroke: e.weight >= 0 ? POS : NEG, "stroke-width": width.toFixed(3),
      "stroke-opacity": 0.55, "data-source": e.source, "data-target": e.target,
      "data-weight": e.weight }, svg("title", {}, `${e.source} → ${e.target}: ${fmt(e.weight, 4)}`)));
  }
  root.append(lines);
  const nodes = svg("g", { class: "nodes" });
  for (const n of graph.nodes) nodes.append(nodeShape(n, L.at.get(n.id), graph));
  root.append(nodes);
  return root;
}

function form(q) {
  const field = (name, label, attrs = {}) => el("label", {}, label,
    el("input", { name, value: q.get(name) ?? attrs.value ?? "", ...attrs }));
  return el("form", { class: "controls", method: "get", action: "/graph" },
    el("label", { style: "flex-basis:100%" }, "prompt",
      el("textarea", { name: "prompt", rows: 2, "data-testid": "graph-prompt" }, q.get("prompt") ?? "")),
    field("target", "target token (empty: the top one)", { size: 14 }),
    field("keep", "keep (nodes)", { size: 5, value: "0.8" }),
    field("edge_keep", "keep (edges)", { size: 5, value: "0.98" }),
    field("max_nodes", "feature budget", { type: "number", min: 0, value: "200" }),
    el("button", { class: "primary", type: "submit" }, "Draw"));
}

export async function graphPage(main, params, { getJSON, ready }) {
  main.replaceChildren(el("h1", {}, "Attribution graph"), el("section", {}, form(params)));
  if (!params.get("prompt")) {
    main.append(el("p", { class: "muted" }, "Type a prompt: its next-token logit is attributed"
      + " through the attached dictionaries (attention patterns, norm scales and MLP gates"
      + " frozen on the prompt, dictionary errors held constant)."));
    ready();
    return;
  }
  const query = new URLSearchParams([...params].filter(([k]) => KEYS.includes(k)));
  const data = await getJSON("/api/graph?" + query);
  const g = data.graph, p = g.pruning;
  const count = (kind) => g.nodes.filter((n) => n.kind === kind).length;
  main.append(el("section", {}, el("p", { class: "stats", "data-testid": "graph-stats" },
    el("span", { "data-key": "target" }, el("b", {}, "target "),
      `${JSON.stringify(g.target.token)} logit ${fmt(g.target.logit)} p ${fmt(g.target.probability)}`),
    el("span", { "data-key": "nodes", "data-value": g.nodes.length }, el("b", {}, "nodes "),
      `${g.nodes.length} of ${data.full.nodes} (${count("feature")} features of ${data.full.features})`),
    el("span", { "data-key": "edges", "data-value": g.edges.length }, el("b", {}, "edges "),
      `${g.edges.length} of ${data.full.edges}`),
    el("span", { "data-key": "kept", "data-value": p.node_fraction }, el("b", {}, "influence kept "),
      `${fmt(p.node_fraction)} (nodes), ${fmt(p.edge_fraction)} (edges)`)),
    el("p", {}, el("a", { href: "/api/graph/json?" + query, download: "",
      "data-testid": "graph-json" }, "Download the graph as JSON"),
      el("span", { class: "muted" }, "  · click a feature for its page; hover for values")),
    el("div", { style: "overflow-x:auto" }, drawGraph(g))));
  ready();
}
