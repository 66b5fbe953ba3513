// The loss curve: train and eval loss by step, drawn as SVG polylines and redrawn as metrics arrive.

import { svg } from "./dom.js";

const W = 640;
const H = 260;
const PAD = { left: 56, right: 16, top: 16, bottom: 32 };
const TICKS = 4;

export class LossChart {
  constructor() {
    // By step, so a step reported twice (an attempt that re-ran it after a crash) is drawn once.
    this.series = { train: new Map(), eval: new Map() };
    this.grid = svg("g", { class: "grid" });
    this.lines = {
      train: svg("polyline", { class: "train", points: "", "data-points": 0 }),
      eval: svg("polyline", { class: "eval", points: "", "data-points": 0 }),
    };
    const middle = { x: W / 2, y: H / 2, "text-anchor": "middle" };
    this.empty = svg("text", middle, "no metrics yet");
    this.el = svg(
      "svg",
      { viewBox: `0 0 ${W} ${H}`, class: "loss-chart", role: "img", "aria-label": "Loss by step" },
      this.grid,
      this.lines.train,
      this.lines.eval,
      this.empty,
      legend(),
    );
    this.pending = false;
  }

  /** Adds a metrics event's data: `train_loss`, and `eval_loss` (`valid_loss` in checkpoint metrics). */
  add(metrics) {
    const evalLoss = metrics.eval_loss ?? metrics.valid_loss;
    if (typeof metrics.train_loss === "number") this.series.train.set(metrics.step, metrics.train_loss);
    if (typeof evalLoss === "number") this.series.eval.set(metrics.step, evalLoss);
    if (!this.pending) {
      // One redraw per frame however many events a stream chunk or history page brought.
      this.pending = true;
      requestAnimationFrame(() => this.draw());
    }
  }

  draw() {
    this.pending = false;
    const points = Object.fromEntries(
      Object.entries(this.series).map(([name, map]) => [name, [...map].sort((a, b) => a[0] - b[0])]),
    );
    const all = [...points.train, ...points.eval];
    this.empty.style.display = all.length ? "none" : "";
    if (!all.length) return;
    const x = scale(
      all.map((p) => p[0]),
      PAD.left,
      W - PAD.right,
    );
    const y = scale(
      all.map((p) => p[1]),
      H - PAD.bottom,
      PAD.top,
    );
    for (const [name, line] of Object.entries(this.lines)) {
      const coordinates = points[name].map(([s, l]) => `${x(s).toFixed(1)},${y(l).toFixed(1)}`);
      line.setAttribute("points", coordinates.join(" "));
      line.setAttribute("data-points", points[name].length);
    }
    this.grid.replaceChildren(...axes(x, y));
  }
}

/** A linear map of the values' range onto [from, to]; a single value maps to the middle. */
function scale(values, from, to) {
  // A loop, not Math.min(...values): spreading a long job's thousands of points can overflow the stack.
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  const map = (v) => (hi === lo ? (from + to) / 2 : from + ((v - lo) / (hi - lo)) * (to - from));
  map.lo = lo;
  map.hi = hi;
  return map;
}

function axes(x, y) {
  const nodes = [];
  for (let i = 0; i <= TICKS; i++) {
    const loss = y.lo + ((y.hi - y.lo) * i) / TICKS;
    const at = y(loss);
    nodes.push(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: at, y2: at }));
    nodes.push(svg("text", { x: PAD.left - 6, y: at + 4, "text-anchor": "end" }, loss.toPrecision(3)));
    if (y.hi === y.lo) break;
  }
  const stepLabel = (step, anchor) =>
    svg("text", { x: x(step), y: H - PAD.bottom + 18, "text-anchor": anchor }, `step ${step}`);
  nodes.push(x.lo === x.hi ? stepLabel(x.lo, "middle") : [stepLabel(x.lo, "start"), stepLabel(x.hi, "end")]);
  return nodes.flat();
}

function legend() {
  const item = (name, label, dx) => [
    svg("line", { class: name, x1: dx, x2: dx + 18, y1: 0, y2: 0 }),
    svg("text", { x: dx + 24, y: 4 }, label),
  ];
  const at = `translate(${W - 200}, ${PAD.top})`;
  return svg("g", { class: "legend", transform: at }, item("train", "train", 0), item("eval", "eval", 90));
}
