// keygate dashboard: copy buttons and the audit log's live tail. Written
// for this project; no framework, nothing loaded from elsewhere.
"use strict";

function copyText(text, button) {
  const done = () => {
    const old = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = old; }, 1500);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  } else {
    fallbackCopy(text, done);
  }
}

function fallbackCopy(text, done) {
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  try { document.execCommand("copy"); done(); } catch (e) { /* nothing */ }
  area.remove();
}

document.addEventListener("click", (ev) => {
  const button = ev.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (source) copyText(source.textContent, button);
});

// Live tail: poll for records newer than the newest shown and prepend them.
(function liveTail() {
  const toggle = document.getElementById("live");
  const body = document.getElementById("audit-rows");
  if (!toggle || !body) return;
  let after = Number(toggle.dataset.after || "0");
  const filter = toggle.dataset.filter || "";
  let timer = null;
  async function poll() {
    try {
      const qs = (filter ? filter + "&" : "") + "after=" + after;
      const resp = await fetch("/audit/rows?" + qs, {
        headers: { "x-requested-with": "keygate" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (resp.status === 401) { window.location.href = "/login"; return; }
      if (!resp.ok) return;
      const html = await resp.text();
      if (!html.trim()) return;
      const tmp = document.createElement("tbody");
      tmp.innerHTML = html;
      const rows = Array.from(tmp.querySelectorAll("tr"));
      for (const row of rows.reverse()) {
        row.classList.add("fresh");
        body.insertBefore(row, body.firstChild);
        after = Math.max(after, Number(row.dataset.seq || "0"));
      }
      const empty = document.getElementById("audit-empty");
      if (empty) empty.remove();
      while (body.children.length > 500) body.lastElementChild.remove();
    } catch (e) { /* offline for a moment: try again next tick */ }
  }
  function set(on) {
    if (timer) { clearInterval(timer); timer = null; }
    if (on) { poll(); timer = setInterval(poll, 2000); }
    try { sessionStorage.setItem("keygate-live", on ? "1" : ""); } catch (e) { /* ignore */ }
  }
  toggle.addEventListener("change", () => set(toggle.checked));
  try { if (sessionStorage.getItem("keygate-live") === "1") { toggle.checked = true; set(true); } } catch (e) { /* ignore */ }
})();
