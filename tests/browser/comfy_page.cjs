// Shared helpers for the headless-Chromium scripts: launch Debian's chromium through
// playwright-core, open ComfyUI's page, wait for the app, load a workflow, run it.
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require("playwright-core");

const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

async function launch() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "ce-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: FLAGS,
    viewport: { width: 1600, height: 1000 },
  });
  const close = async () => {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}

/** Open ComfyUI and wait until its app has a graph and a canvas. */
async function openComfy(page, url) {
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => {
    const app = window.comfyAPI?.app?.app;
    return !!(app && app.graph && app.canvas && app.extensionManager);
  }, null, { timeout: 90000 });
  await page.waitForTimeout(1500); // node definitions and settings settle
}

/** Load a UI-format workflow; `widgets` maps node type -> {widget name: value} to override.
 * A new user's first page may replace the graph once more after start-up (the getting-started
 * flow), so the load is repeated until the graph holds the workflow's nodes. */
async function loadWorkflow(page, workflow, widgets = {}) {
  for (let attempt = 0; attempt < 3; attempt++) {
    await page.evaluate(async ([wf, overrides]) => {
      const app = window.comfyAPI.app.app;
      await app.loadGraphData(wf, true, true, "ce_test");
      for (const node of app.graph.nodes) {
        for (const [name, value] of Object.entries(overrides[node.type] || {})) {
          const widget = node.widgets?.find((w) => w.name === name);
          if (widget) widget.value = value;
        }
      }
      app.graph.setDirtyCanvas(true, true);
    }, [workflow, widgets]);
    await page.waitForTimeout(1000);
    const count = await page.evaluate(() => window.comfyAPI.app.app.graph.nodes.length);
    if (count === workflow.nodes.length) return;
  }
  throw new Error("the workflow did not stay loaded");
}

/** Queue the loaded graph as the Run button does, and wait until the server's queue is empty;
 * returns the history entry's status of the prompt. */
async function runGraph(page, timeoutMs = 600000) {
  const before = await page.evaluate(async () => Object.keys(await (await fetch("/api/history")).json()));
  const errors = [];
  let refused = 0;
  const onConsole = (m) => { if (m.type() === "error") errors.push(m.text()); };
  page.on("console", onConsole);
  const onResponse = async (r) => {
    if (r.url().endsWith("/prompt") && r.request().method() === "POST" && r.status() !== 200) {
      refused += 1;
      errors.push(`POST /prompt ${r.status()}: ${await r.text()}`);
    }
  };
  page.on("response", onResponse);
  const queue = () => page.evaluate(async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); });
  await queue();
  const deadline = Date.now() + timeoutMs;
  let idle = 0;
  let attempts = 1;
  for (;;) {
    const state = await page.evaluate(async (known) => {
      const queue = await (await fetch("/api/queue")).json();
      const history = await (await fetch("/api/history")).json();
      const fresh = Object.keys(history).filter((id) => !known.includes(id));
      const busy = queue.queue_running.length + queue.queue_pending.length;
      return { busy, fresh: fresh.map((id) => history[id].status) };
    }, before);
    if (state.fresh.length && !state.busy) {
      page.off("console", onConsole);
      page.off("response", onResponse);
      await page.waitForTimeout(800); // the last executed messages, then a redraw
      return state.fresh[state.fresh.length - 1];
    }
    idle = state.busy ? 0 : idle + 1;
    // Right after a page load the front-end sometimes sends a prompt without its output nodes
    // (HTTP 400 prompt_no_outputs); the same click a moment later is accepted.
    if (!state.fresh.length && !state.busy && refused >= attempts && attempts < 3) {
      attempts += 1;
      await page.waitForTimeout(2000);
      await queue();
      continue;
    }
    if (idle > 20) { // nothing queued or running for 20 s and no history entry: the queue refused it
      page.off("console", onConsole);
      page.off("response", onResponse);
      throw new Error(`the prompt was not queued; console errors: ${errors.join(" | ").slice(0, 3000)}`);
    }
    if (Date.now() > deadline) throw new Error(`the run did not finish within ${timeoutMs} ms`);
    await page.waitForTimeout(1000);
  }
}

module.exports = { launch, openComfy, loadWorkflow, runGraph };
