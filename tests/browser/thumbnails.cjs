// Open each example workflow in ComfyUI's real front-end, optionally run it (64x64, 2 steps),
// measure every node as the front-end laid it out, and screenshot the graph.
// Prints {name: {status, before: [...], after: [...]}} on stdout; writes OUT_DIR/<name>.png.
//
// usage: node thumbnails.cjs URL OUT_DIR RUN(0|1) REPORTS.json|- WORKFLOW.json...
// REPORTS.json: {name: {node id: ce_report payload}} shown on the nodes (as after a run) without running.
"use strict";

const fs = require("fs");
const path = require("path");
const { launch, openComfy, loadWorkflow, runGraph } = require("./comfy_page.cjs");

const FAST = {
  KSampler: { steps: 2 },
  EmptyLatentImage: { width: 64, height: 64 },
  CE_LoadConcepts: { preserve_set: "none" },
};

function measure() {
  const app = window.comfyAPI.app.app;
  const TITLE = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  return app.graph.nodes.map((n) => ({
    id: n.id, type: n.type, title: n.title, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
    rect: [n.pos[0], n.pos[1] - TITLE, n.size[0], n.size[1] + TITLE],
    report: n.properties?.ce_report ?? null,
    title_px: (() => { const c = app.canvas.ctx; c.save(); c.font = n.titleFontStyle; const w = c.measureText(n.title).width; c.restore(); return w; })(),
  }));
}

async function frame(page) {
  await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    app.canvas.show_info = false;
    const nodes = app.graph.nodes;
    const TITLE = 30;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 20;
    const y0 = Math.min(...nodes.map((n) => n.pos[1] - TITLE)) - 20;
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20;
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20;
    app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom: 0.98 });
    app.graph.setDirtyCanvas(true, true);
  });
  await page.waitForTimeout(800);
}

(async () => {
  const [url, outDir, run, reportsFile, ...workflows] = process.argv.slice(2);
  const reports = reportsFile === "-" ? {} : JSON.parse(fs.readFileSync(reportsFile, "utf8"));
  const { context, close } = await launch();
  const result = {};
  try {
    const page = await context.newPage();
    await openComfy(page, url);
    await page.addStyleTag({ content: ".minimap-main-container, .p-buttongroup-vertical { display: none !important; }" });
    for (const file of workflows) {
      const name = path.basename(file, ".json");
      const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
      for (const node of workflow.nodes) {
        const report = reports[name]?.[String(node.id)];
        if (report) node.properties = { ...(node.properties || {}), ce_report: report };
      }
      await loadWorkflow(page, workflow, run === "1" ? FAST : {});
      const entry = { before: await page.evaluate(measure) };
      if (run === "1") {
        entry.status = (await runGraph(page)).status_str;
        await page.waitForTimeout(500);
      }
      entry.after = await page.evaluate(measure);
      await frame(page);
      const box = await page.evaluate(() => {
        const r = window.comfyAPI.app.app.canvas.canvas.getBoundingClientRect();
        return { x: r.x, y: r.y, width: r.width, height: r.height };
      });
      await page.screenshot({ path: path.join(outDir, `${name}.png`), clip: box });
      result[name] = entry;
    }
  } finally {
    await close();
  }
  process.stdout.write(JSON.stringify(result));
})().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});
