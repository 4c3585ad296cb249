// Queue an example workflow in a real ComfyUI page and report what the Concept Erasure
// front-end drew on each CE_* node, then the same after a reload, then with our extension's
// script blocked (what a missing extension looks like). Prints one JSON object on stdout.
//
// usage: node check_report.cjs URL WORKFLOW.json SCREENSHOT.png
"use strict";

const fs = require("fs");
const { launch, openComfy, loadWorkflow, runGraph } = require("./comfy_page.cjs");

const FAST = {
  KSampler: { steps: 2 },
  EmptyLatentImage: { width: 64, height: 64 },
  CE_LoadConcepts: { preserve_set: "none" },
};

function collect() {
  const app = window.comfyAPI.app.app;
  const ext = app.extensions.map((e) => e.name);
  const nodes = app.graph.nodes.filter((n) => n.type.startsWith("CE_")).map((n) => {
    const widget = n.widgets?.find((w) => w.name === "ce_report");
    return {
      id: n.id, type: n.type, pos: [...n.pos], size: [...n.size],
      payload: widget?.value ?? null, drawn: widget?.drawn ?? [],
      saved: n.properties?.ce_report ?? null,
    };
  });
  return { extensions: ext, nodes };
}

async function redraw(page) {
  await page.evaluate(() => window.comfyAPI.app.app.graph.setDirtyCanvas(true, true));
  await page.waitForTimeout(800);
}

(async () => {
  const [url, workflowPath, screenshot] = process.argv.slice(2);
  const workflow = JSON.parse(fs.readFileSync(workflowPath, "utf8"));
  const { context, close } = await launch();
  const out = {};
  try {
    const page = await context.newPage();
    page.on("pageerror", (e) => process.stderr.write(`pageerror: ${e}\n`));
    await openComfy(page, url);
    await loadWorkflow(page, workflow, FAST);
    out.run = (await runGraph(page)).status_str;
    await page.evaluate(() => window.comfyAPI.app.app.canvas.ds.reset?.());
    await redraw(page);
    out.after_run = await page.evaluate(collect);
    await page.screenshot({ path: screenshot });

    // Reload: the saved workflow (as the browser keeps it) brings the last report back.
    const saved = await page.evaluate(() => window.comfyAPI.app.app.graph.serialize());
    await page.reload({ waitUntil: "domcontentloaded" });
    await openComfy(page, url);
    await loadWorkflow(page, saved);
    await redraw(page);
    out.after_reload = await page.evaluate(collect);

    // The same page without our extension's script: nothing is drawn on the nodes.
    await page.route("**/extensions/concept_erasure/**", (route) => route.abort());
    await page.reload({ waitUntil: "domcontentloaded" });
    await openComfy(page, url);
    await loadWorkflow(page, saved);
    await redraw(page);
    out.without_extension = await page.evaluate(collect);
  } finally {
    await close();
  }
  process.stdout.write(JSON.stringify(out));
})().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});
