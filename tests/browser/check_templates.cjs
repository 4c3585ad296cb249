// Open ComfyUI's template browser, pick this pack's category and report each template card:
// its title, description and whether its thumbnail image loaded. Prints JSON on stdout.
//
// usage: node check_templates.cjs URL CATEGORY_LABEL SCREENSHOT.png
"use strict";

const { launch, openComfy } = require("./comfy_page.cjs");

(async () => {
  const [url, label, screenshot] = process.argv.slice(2);
  const { context, close } = await launch();
  let out;
  try {
    const page = await context.newPage();
    await openComfy(page, url);
    await page.evaluate(() => window.comfyAPI.app.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
    const fetched = {};
    page.on("response", (r) => {
      if (r.url().includes("/workflow_templates/") && r.url().endsWith(".jpg")) fetched[r.url()] = r.status();
    });
    try {
      await page.getByText(label, { exact: true }).first().click({ timeout: 30000 });
      await page.waitForSelector('[data-testid^="template-workflow-"] img', { timeout: 30000 });
    } catch (e) {
      await page.screenshot({ path: screenshot });
      throw e;
    }
    await page.waitForTimeout(2000); // the images load
    // Cards below the fold load their thumbnail only when scrolled into view: show each once.
    const count = await page.locator('[data-testid^="template-workflow-"]').count();
    const seen = {}; // name -> its thumbnail was drawn while the card was in view
    for (let i = 0; i < count; i++) {
      const card = page.locator('[data-testid^="template-workflow-"]').nth(i);
      await card.scrollIntoViewIfNeeded();
      await page.waitForTimeout(500);
      const [name, drawn] = await card.evaluate((el) => {
        const img = el.querySelector("img");
        return [el.dataset.testid.replace("template-workflow-", ""), !!(img && img.complete && img.naturalWidth > 0)];
      });
      seen[name] = drawn;
    }
    const cards = (await page.evaluate(() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
      .map((card) => {
        const img = card.querySelector("img");
        return {
          name: card.dataset.testid.replace("template-workflow-", ""),
          title: card.querySelector("h3")?.textContent.trim() ?? "",
          description: card.querySelector("p")?.textContent.trim() ?? "",
          shown: !!(img && img.complete && img.naturalWidth > 0),
        };
      })))
      .map((card) => ({ ...card, shown: card.shown || !!seen[card.name] }));
    // The front-end fetches each thumbnail and shows it from a blob: URL; match them by name.
    out = cards.map((card) => {
      const url = Object.keys(fetched).find((u) => u.endsWith(`/${card.name}.jpg`)) ?? "";
      return { ...card, src: url, status: fetched[url] ?? null };
    });
    await page.screenshot({ path: screenshot });
  } finally {
    await close();
  }
  process.stdout.write(JSON.stringify(out));
})().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});
