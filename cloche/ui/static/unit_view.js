// The unit page's results, drawn from its data alone: the live page and an exported file
// (cloche.ui.export_unit_page, which inlines this script) draw the same thing. A feature of a
// dictionary (point dict:<name>:features) is named as one; its correlated units are features.
import { fmt, histogram, tokens } from "./plots.js";
import { el, link } from "./dom.js";

export function example(e, scale) {
  return el("div", { class: "example", "data-example-id": e.example_id, "data-position": e.position,
    "data-activation": e.activation },
    el("span", { class: "act" }, fmt(e.activation)),
    tokens(e.tokens, e.values, { peak: e.peak, scale }),
    el("span", { class: "muted" }, `#${e.example_id}@${e.position}`));
}

function tokenList(rows, testid) {
  return el("table", { class: "grid list", "data-testid": testid },
    ...rows.map(([t, v]) => el("tr", {}, el("td", { class: "left" }, JSON.stringify(t)),
      el("td", { class: "val", "data-value": v }, fmt(v)))));
}

export function unitTitle(data) {
  const noun = data.dictionary ? "feature" : "unit";
  return `${data.point} · ${data.index != null ? `${noun} ${data.index}` : "a direction"}`;
}

// Appends the results to `body`; `live` pages link to other units, exported files do not.
// Returns the colour scale of the activations.
export function renderUnit(body, data, { live = true, dataset = null, limit = null } = {}) {
  const s = data.stats;
  const scale = Math.max(Math.abs(s.max), Math.abs(s.min), 1e-9);
  const noun = data.dictionary ? "feature" : "unit";
  const d = data.dictionary;
  body.append(el("section", {}, el("div", { class: "stats", "data-testid": "stats" },
    ...[["count", s.count], ["mean", s.mean], ["std", s.std], ["min", s.min], ["max", s.max],
        ["density (>0)", s.density]].map(([k, v]) => el("span", { "data-stat": k, "data-value": v },
      el("b", {}, k + " "), typeof v === "number" && !Number.isInteger(v) ? fmt(v) : String(v)))),
    d ? el("p", { class: "muted", "data-testid": "dictionary" }, `feature of dictionary ${d.name}`
      + ` (${d.architecture}, d_sae ${d.d_dict}) at ${d.point}`) : null,
    el("p", { class: "muted" }, `${data.dataset}, first ${data.limit} examples; top examples skip`
      + ` the first ${data.choice.skip_first} positions, one per example`)));
  const hist = el("div", { "data-testid": "histogram" },
    histogram(data.histogram.edges, data.histogram.counts, { log: true }));
  const logits = data.logits.reason
    ? el("p", { class: "muted", "data-testid": "logits" }, data.logits.reason)
    : el("div", { "data-testid": "logits" },
        data.logits.through ? el("p", { class: "muted", "data-testid": "logits-through" },
          `through ${data.logits.through}`) : null,
        el("div", { class: "row" },
          el("div", {}, el("h3", {}, "promotes"), tokenList(data.logits.top, "logits-top")),
          el("div", {}, el("h3", {}, "suppresses"), tokenList(data.logits.bottom, "logits-bottom"))));
  const name = (u) => live
    ? el("a", { href: link("unit", { point: data.point, unit: u, dataset, limit }) }, `${noun} ${u}`)
    : `${noun} ${u}`;
  const corrRow = ([u, r]) => el("tr", { "data-unit": u, "data-r": r },
    el("td", { class: "left" }, name(u)), el("td", { class: "val" }, fmt(r)));
  const corr = data.correlated
    ? el("div", { class: "row", "data-testid": "correlated" },
        el("div", {}, el("h3", {}, "most correlated"), el("table", { class: "grid list" },
          ...data.correlated.positive.map(corrRow))),
        el("div", {}, el("h3", {}, "most anti-correlated"), el("table", { class: "grid list" },
          ...data.correlated.negative.map(corrRow))))
    : el("p", { class: "muted" }, `correlations are shown for single ${noun}s`);
  body.append(el("div", { class: "row" },
    el("section", {}, el("h2", {}, "Activations (log counts)"), hist),
    el("section", {}, el("h2", {}, "Direct effect on the logits"), logits),
    el("section", {}, el("h2", {}, `Correlated ${noun}s (Pearson)`), corr)));
  body.append(el("section", { "data-testid": "top-examples" }, el("h2", {}, "Top examples"),
    ...data.top.map((e) => example(e, scale))));
  const bins = el("section", { "data-testid": "quantiles" }, el("h2", {}, "Examples across the range"));
  for (const b of [...data.quantiles].reverse()) {
    bins.append(el("h3", {}, `[${fmt(b.low)}, ${fmt(b.high)}]`),
      ...(b.examples.length ? b.examples.map((e) => example(e, scale))
                            : [el("p", { class: "muted" }, "no tokens in this range")]));
  }
  body.append(bins);
  return scale;
}
