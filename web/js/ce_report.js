// Draws each Concept Erasure node's result on the node after it runs.
//
// Every CE_* node sends `ui.ce_report = [{title, lines, bars}]` (nodes/_report.py). This
// extension keeps the last payload in `node.properties.ce_report` (so it is saved with the
// workflow and comes back on reload) and draws it in a canvas widget at the bottom of the node:
// the lines, wrapped to the node's width, then one bar per measured number, filled to
// value / limit and coloured by which end is the good one.

import { app } from "../../../scripts/app.js";

const EXTENSION = "concept_erasure.report";
const KEY = "ce_report";
const FONT = "12px Arial";
const LINE_H = 15;
const BAR_H = 16;
const PAD = 6;
const MAX_LINES = 30;
const MIN_WIDTH = 240;
const LABEL_SHARE = 0.42; // of the inner width, for a bar's label
const COLOURS = {
  text: "#d8d8d8", dim: "#8a8a8a", track: "#1b1b1b", border: "#444",
  good: "#3f9d4a", fair: "#c9a227", poor: "#c8493f", none: "#555",
};

let measureCtx = null;
function measure(text) {
  measureCtx ??= document.createElement("canvas").getContext("2d");
  measureCtx.font = FONT;
  return measureCtx.measureText(text).width;
}

/** The payload if it has the shape nodes/_report.py sends, else null. */
export function validReport(report) {
  if (!report || typeof report !== "object") return null;
  const lines = Array.isArray(report.lines) ? report.lines.map(String) : [];
  const bars = Array.isArray(report.bars) ? report.bars.filter((b) => b && typeof b === "object") : [];
  if (!lines.length && !bars.length) return null;
  return { title: String(report.title ?? ""), lines, bars };
}

/** Greedy word wrap of one report line to `width` pixels. */
function wrap(line, width) {
  const out = [];
  for (const para of line.split("\n")) {
    let current = "";
    for (const word of para.split(" ")) {
      const next = current ? `${current} ${word}` : word;
      if (current && measure(next) > width) {
        out.push(current);
        current = word;
      } else {
        current = next;
      }
    }
    out.push(current);
  }
  return out;
}

function layout(report, width) {
  const inner = Math.max(40, width - 2 * PAD);
  let rows = report.lines.flatMap((line) => wrap(line, inner));
  if (rows.length > MAX_LINES) rows = [...rows.slice(0, MAX_LINES - 1), `… ${rows.length - MAX_LINES + 1} more lines (see the report output)`];
  const height = PAD + rows.length * LINE_H + (report.bars.length ? 4 + report.bars.length * (BAR_H + 3) : 0) + PAD;
  return { rows, height };
}

/** Share of the bar to fill, and its colour (null value: "n/a", grey). */
export function barFill(bar) {
  const limit = Number(bar.limit) > 0 ? Number(bar.limit) : 1;
  if (bar.value === null || bar.value === undefined || !Number.isFinite(Number(bar.value))) {
    return { share: 0, colour: COLOURS.none };
  }
  const share = Math.min(1, Math.max(0, Number(bar.value) / limit));
  const badness = bar.good === "high" ? 1 - share : share;
  const colour = badness <= 1 / 3 ? COLOURS.good : badness <= 2 / 3 ? COLOURS.fair : COLOURS.poor;
  return { share, colour };
}

function clipText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let cut = text;
  while (cut.length > 1 && ctx.measureText(`${cut}…`).width > width) cut = cut.slice(0, -1);
  return `${cut}…`;
}

function drawReport(ctx, node, widget, width, y) {
  const report = widget.value;
  if (!report) return;
  const { rows, height } = layout(report, width);
  const drawn = [];
  ctx.save();
  ctx.fillStyle = COLOURS.track;
  ctx.strokeStyle = COLOURS.border;
  ctx.beginPath();
  ctx.roundRect?.(PAD / 2, y, width - PAD, height - 2, 4) ?? ctx.rect(PAD / 2, y, width - PAD, height - 2);
  ctx.fill();
  ctx.stroke();
  ctx.font = FONT;
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  let row = y + PAD;
  for (const text of rows) {
    ctx.fillStyle = COLOURS.text;
    ctx.fillText(text, PAD + 2, row + LINE_H / 2);
    drawn.push(text);
    row += LINE_H;
  }
  if (report.bars.length) row += 4;
  const inner = width - 2 * PAD;
  const labelW = Math.round(inner * LABEL_SHARE);
  const barX = PAD + labelW + 4;
  const barW = Math.max(20, inner - labelW - 4);
  for (const bar of report.bars) {
    const { share, colour } = barFill(bar);
    const label = clipText(ctx, String(bar.label ?? ""), labelW - 2);
    ctx.fillStyle = COLOURS.dim;
    ctx.textAlign = "left";
    ctx.fillText(label, PAD + 2, row + BAR_H / 2);
    ctx.fillStyle = "#2c2c2c";
    ctx.fillRect(barX, row + 1, barW, BAR_H - 2);
    ctx.fillStyle = colour;
    ctx.fillRect(barX, row + 1, barW * share, BAR_H - 2);
    const text = String(bar.text ?? (bar.value ?? "n/a"));
    ctx.fillStyle = "#f2f2f2";
    ctx.textAlign = "right";
    ctx.fillText(clipText(ctx, text, barW - 6), barX + barW - 3, row + BAR_H / 2);
    drawn.push(`${bar.label ?? ""}: ${text}`);
    row += BAR_H + 3;
  }
  ctx.restore();
  widget.drawn = drawn; // what is on the canvas now (read by tests/browser)
}

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === KEY);
  if (widget) return widget;
  widget = {
    name: KEY,
    type: "ce_report",
    value: null,
    serialize: false, // the payload lives in node.properties, not in widgets_values
    options: {},
    drawn: [],
    draw(ctx, drawNode, width, y) {
      drawReport(ctx, drawNode, this, width, y);
    },
    // The lines wrap to the node's own width, whatever width the caller measures with.
    computeSize() {
      return [node.size[0], this.value ? layout(this.value, node.size[0]).height : 0];
    },
  };
  node.addCustomWidget(widget);
  return widget;
}

/** Show `report` on `node` and make the node just tall enough for it. */
export function showReport(node, report) {
  const valid = validReport(report);
  if (!valid) return false;
  node.properties ??= {};
  node.properties[KEY] = valid;
  const widget = reportWidget(node);
  widget.value = valid;
  // Keep the width the workflow gave the node (neighbours sit beside it): lines wrap, the node grows down.
  const width = Math.max(node.size[0], MIN_WIDTH);
  node.size[0] = width; // first, so that the height is measured at this width
  node.setSize([width, node.computeSize()[1]]);
  node.setDirtyCanvas?.(true, true);
  return true;
}

function isOurs(nodeData) {
  return typeof nodeData?.name === "string" && nodeData.name.startsWith("CE_");
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isOurs(nodeData)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      showReport(this, message?.[KEY]?.[0]);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      // The last report, saved with the workflow (properties are restored before onConfigure).
      const saved = this.properties?.[KEY];
      if (saved) showReport(this, saved);
      return result;
    };
  },
});
