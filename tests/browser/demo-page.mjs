// Drives the demo page in Debian's Chromium for the end-to-end suite.
//
// Usage: node demo-page.mjs <page URL with #token=...> <channel> <expected text> <screenshot path>
//
// Prints `ready <publish command shown on the page>` once the page is subscribed, then waits
// for an event whose text contains the expected text, prints `seen <direction> <text>`, saves a
// screenshot and exits 0. Any failure exits 1 with the reason on stderr.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, channel, expected, screenshot] = process.argv.slice(2);
const TIMEOUT_MS = 20000;
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const profile = mkdtempSync(join(tmpdir(), "notify-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  args: CHROMIUM_ARGS,
});
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(TIMEOUT_MS);
  await page.goto(url);
  await page.locator('#state[data-kind="connected"]').waitFor();

  await page.fill("#channel", channel);
  await page.click('#subscribe-form button[type="submit"]');
  const row = page.locator("#channels li", { hasText: `position` }).filter({ hasText: channel });
  await row.waitFor();
  const command = await row.locator("code").textContent();
  console.log(`ready ${command}`);

  const event = page.locator("#events li pre", { hasText: expected });
  await event.waitFor();
  const direction = await event.evaluate((element) => getComputedStyle(element).direction);
  console.log(`seen ${direction} ${(await event.textContent()).replace(/\s+/g, " ")}`);
  await page.screenshot({ path: screenshot, fullPage: true });
} catch (error) {
  console.error(`demo page check failed: ${error.message}`);
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
