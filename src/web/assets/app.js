// Outpost admin page: the only script. While a credential's jobs run, the detail page
// fetches its jobs section every second and puts it in place; once every job has ended
// it reloads the page once, so that the record shows the operation's outcome.
// The fragment is the server's own escaped HTML (same origin, same session).
(function () {
  "use strict";
  var PERIOD = 1000;
  function poll() {
    var section = document.getElementById("jobs");
    if (!section || section.getAttribute("data-active") !== "true") {
      return;
    }
    setTimeout(function () {
      fetch(section.getAttribute("data-src"), {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
      })
        .then(function (r) {
          if (r.redirected || r.status === 401) {
            window.location.assign("/login");
            throw new Error("logged out");
          }
          if (!r.ok) {
            throw new Error("HTTP " + r.status);
          }
          return r.text();
        })
        .then(function (text) {
          var holder = document.createElement("div");
          holder.innerHTML = text;
          var fresh = holder.querySelector("#jobs");
          var current = document.getElementById("jobs");
          if (fresh && current) {
            current.replaceWith(fresh);
            if (fresh.getAttribute("data-active") !== "true") {
              window.location.reload();
              return;
            }
          }
          poll();
        })
        .catch(function () {
          poll();
        });
    }, PERIOD);
  }
  document.addEventListener("DOMContentLoaded", poll);
})();
