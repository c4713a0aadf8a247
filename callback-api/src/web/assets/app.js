// The web view's only script: refreshes the parts of a page marked data-live by fetching their
// server-rendered HTML again (same origin, the sign-in cookie). The server escapes every value
// and the Content-Security-Policy allows no inline script, so the HTML is set as it comes.
"use strict";

const FINISHED_TICKS = 5;

function refresh(element) {
  const url = element.dataset.live;
  const interval = Number(element.dataset.interval) || 2000;
  let last = null;
  let finishedTicks = 0;
  const tick = async () => {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        window.location.assign("/ui/sign-in");
        return;
      }
      if (response.ok) {
        const html = await response.text();
        if (html !== last) {
          last = html;
          element.innerHTML = html;
        }
        const state = element.querySelector("[data-finished]");
        // The last progress summary lands a moment after the phase: a few more looks, then
        // a finished task changes no more.
        if (state && state.dataset.finished === "true" && ++finishedTicks >= FINISHED_TICKS) {
          return;
        }
      }
    } catch (_) {
      // offline for a moment: try again at the next tick
    }
    window.setTimeout(tick, interval);
  };
  window.setTimeout(tick, interval);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(refresh);
});
