// Plots drawn in the browser as SVG: heat maps, histograms, shaded tokens. No dependencies.
const SVG = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) if (c != null) node.append(c);
  return node;
}

export function fmt(v, digits = 3) {
  if (v == null || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toFixed(digits);
}

// white -> blue for [lo, hi] (the notebook grids' colours)
export function blue(t) {
  const s = Math.max(0, Math.min(1, t));
  return `rgba(37,99,235,${(0.9 * s).toFixed(3)})`;
}

// signed: orange for positive, blue for negative, alpha by |v| / scale
export function signed(v, scale) {
  if (!scale || v == null) return "transparent";
  const t = Math.max(-1, Math.min(1, v / scale));
  return t >= 0 ? `rgba(234,88,12,${(0.85 * t).toFixed(3)})`
                : `rgba(37,99,235,${(-0.85 * t).toFixed(3)})`;
}

// A heat map: values[r][c]; options: rowLabels, colLabels, cell, lo, hi, link(r, c), label(r, c, v)
export function heatmap(values, opts = {}) {
  const rows = values.length, cols = rows ? values[0].length : 0;
  const cell = opts.cell ?? 28, left = opts.rowLabels ? (opts.left ?? 40) : 0;
  const top = opts.colLabels ? (opts.top ?? 18) : 0;
  const flat = values.flat().filter((v) => v != null && Number.isFinite(v));
  const lo = opts.lo ?? Math.min(0, ...flat), hi = opts.hi ?? Math.max(...flat, lo + 1e-9);
  const root = svg("svg", { width: left + cols * cell + 2, height: top + rows * cell + 2,
                            class: "heatmap" });
  if (opts.colLabels) opts.colLabels.forEach((t, c) => root.append(svg("text", {
    x: left + c * cell + cell / 2, y: top - 5, "text-anchor": opts.rotate ? "start" : "middle",
    transform: opts.rotate ? `rotate(-60 ${left + c * cell + cell / 2} ${top - 5})` : "",
  }, String(t))));
  if (opts.rowLabels) opts.rowLabels.forEach((t, r) => root.append(svg("text", {
    x: left - 4, y: top + r * cell + cell / 2 + 3, "text-anchor": "end" }, String(t))));
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const v = values[r][c];
    const rect = svg("rect", { x: left + c * cell, y: top + r * cell, width: cell, height: cell,
      fill: v == null ? "#fff" : opts.signed ? signed(v, Math.max(Math.abs(lo), Math.abs(hi)))
        : blue((v - lo) / (hi - lo)), stroke: "#e5e5e5", class: "cell",
      "data-row": r, "data-col": c, "data-value": v ?? "" },
      svg("title", {}, opts.label ? opts.label(r, c, v) : `[${r}, ${c}] ${fmt(v, 4)}`));
    if (opts.link) {
      const a = svg("a", { href: opts.link(r, c) });
      a.append(rect);
      root.append(a);
    } else root.append(rect);
    if (opts.showValues && cell >= 26 && v != null) root.append(svg("text", {
      x: left + c * cell + cell / 2, y: top + r * cell + cell / 2 + 3, "text-anchor": "middle",
      "pointer-events": "none", style: (v - lo) / (hi - lo) > 0.6 ? "fill:#fff" : "" },
      v.toFixed(2)));
  }
  return root;
}

// A histogram from bin edges and counts; log-scaled counts if opts.log
export function histogram(edges, counts, opts = {}) {
  const width = opts.width ?? 520, height = opts.height ?? 160, pad = 28;
  const ys = counts.map((c) => (opts.log ? Math.log10(1 + c) : c));
  const ymax = Math.max(...ys, 1e-9);
  const bw = (width - pad) / counts.length;
  const root = svg("svg", { width, height: height + 20, class: "histogram" });
  counts.forEach((c, i) => {
    const h = (ys[i] / ymax) * (height - 10);
    root.append(svg("rect", { x: pad + i * bw, y: height - h, width: Math.max(1, bw - 1),
      height: h, fill: edges[i + 1] > 0 ? "rgb(234,88,12)" : "rgb(37,99,235)", class: "bar",
      "data-count": c, "data-low": edges[i], "data-high": edges[i + 1] },
      svg("title", {}, `[${fmt(edges[i])}, ${fmt(edges[i + 1])}): ${c} tokens`)));
  });
  root.append(svg("line", { x1: pad, x2: width, y1: height, y2: height, stroke: "#999" }));
  root.append(svg("text", { x: pad, y: height + 14 }, fmt(edges[0], 2)));
  root.append(svg("text", { x: width, y: height + 14, "text-anchor": "end" },
    fmt(edges[edges.length - 1], 2)));
  root.append(svg("text", { x: pad - 4, y: 10, "text-anchor": "end" },
    opts.log ? `10^${ymax.toFixed(1)}` : String(Math.round(ymax))));
  return root;
}

// Tokens shaded by value (signed colours); peak index outlined; values kept in data attributes
export function tokens(strs, values, opts = {}) {
  const box = document.createElement("span");
  box.className = "tokens";
  const scale = opts.scale ?? Math.max(1e-9, ...values.map((v) => Math.abs(v ?? 0)));
  strs.forEach((t, i) => {
    const s = document.createElement("span");
    s.className = "tok" + (i === opts.peak ? " peak" : "");
    s.textContent = opts.breaks ? t.replace(/\n/g, "↵\n") : t.replace(/\n/g, "↵");
    const v = values[i];
    s.style.background = opts.colour ? opts.colour(v, scale) : signed(v, scale);
    s.dataset.value = v;
    s.title = `${JSON.stringify(t)}: ${fmt(v, 4)}` + (opts.extra ? opts.extra(i) : "");
    box.append(s);
  });
  return box;
}

// A small heat map on a canvas (thumbnails: many cells, no hover), white -> blue over [lo, hi]
export function thumbnail(values, opts = {}) {
  const rows = values.length, cols = rows ? values[0].length : 0;
  const cell = opts.cell ?? 3, lo = opts.lo ?? 0, hi = opts.hi ?? 1;
  const canvas = document.createElement("canvas");
  canvas.width = cols * cell;
  canvas.height = rows * cell;
  canvas.className = "thumbnail";
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const v = values[r][c];
    if (v == null || v <= lo) continue;
    ctx.fillStyle = blue((v - lo) / (hi - lo));
    ctx.fillRect(c * cell, r * cell, cell, cell);
  }
  return canvas;
}
