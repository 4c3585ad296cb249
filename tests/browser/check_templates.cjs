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
    await page.getByText(label, { exact: true }).first().click({ timeout: 30000 });
    await page.waitForSelector('img[src*="workflow_templates/"]', { timeout: 30000 });
    await page.waitForTimeout(1500); // the images load
    out = await page.evaluate(() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')].map((card) => {
      const img = card.querySelector("img");
      return {
        name: card.dataset.testid.replace("template-workflow-", ""),
        title: card.querySelector("h3")?.textContent.trim() ?? "",
        description: card.querySelector("p")?.textContent.trim() ?? "",
        src: img?.getAttribute("src") ?? "",
        loaded: !!(img && img.complete && img.naturalWidth > 0),
      };
    }));
    await page.screenshot({ path: screenshot });
  } finally {
    await close();
  }
  process.stdout.write(JSON.stringify(out));
})().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});
