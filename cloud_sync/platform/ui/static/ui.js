// edgefn console: live updates by short polling, confirmation of actions. No libraries.
"use strict";
// Every 3 s: fetch the same URL as a fragment and swap <main> (the server renders it, escaped).
// Paused while the tab is hidden; a failed poll is retried at the next tick.
const POLL_MS = 3000;
function poll() {
  const main = document.getElementById("main");
  if (!main || main.dataset.live !== "1" || document.hidden) return;
  if (main.contains(document.activeElement) && document.activeElement.tagName !== "BODY"
      && document.activeElement.tagName !== "A") return;  // do not swap under a typing user
  fetch(location.href, { headers: { "X-Fragment": "1" }, credentials: "same-origin" })
    .then((r) => (r.ok && r.headers.get("X-Fragment") === "1" ? r.text() : null))
    .then((html) => { if (html !== null && html !== main.innerHTML) { main.innerHTML = html; main.dataset.updated = String(Date.now()); } })
    .catch(() => {});
}
setInterval(poll, POLL_MS);
document.addEventListener("submit", (e) => {
  const msg = e.target.dataset && e.target.dataset.confirm;
  if (msg && !window.confirm(msg)) e.preventDefault();
});
