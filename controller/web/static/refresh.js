// leasectl status page: refresh the live regions in place every few seconds, without reloading.
// Without JavaScript the page refreshes itself with <meta http-equiv="refresh"> instead.
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh")) || 5;
  var busy = false;

  function editing() {
    var el = document.activeElement;
    return el && (el.tagName === "INPUT" || el.tagName === "SELECT" || el.tagName === "TEXTAREA");
  }

  function swap(fresh) {
    var live = document.querySelectorAll("[data-live][id]");
    for (var i = 0; i < live.length; i++) {
      var next = fresh.getElementById(live[i].id);
      if (!next) { continue; }
      // Keep what the reader opened: <details> stay as they are.
      var open = {};
      live[i].querySelectorAll("details[id]").forEach(function (d) { open[d.id] = d.open; });
      next.querySelectorAll("details[id]").forEach(function (d) {
        if (Object.prototype.hasOwnProperty.call(open, d.id)) { d.open = open[d.id]; }
      });
      if (live[i].innerHTML !== next.innerHTML) { live[i].innerHTML = next.innerHTML; }
    }
    document.title = fresh.title;
  }

  function tick() {
    if (busy || document.hidden || editing()) { return; }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html) { swap(new DOMParser().parseFromString(html, "text/html")); }
        document.body.classList.toggle("stale", !html);
      })
      .catch(function () { document.body.classList.add("stale"); })
      .then(function () { busy = false; });
  }

  window.setInterval(tick, seconds * 1000);
})();
