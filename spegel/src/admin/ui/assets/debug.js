// Spegel debug page: refreshes the stats fragment every 2 s and runs the measure tool.
'use strict';
(function () {
  const stats = document.getElementById('stats');
  const conn = document.getElementById('conn');
  async function refresh() {
    try {
      const r = await fetch('/debug/web/stats', { cache: 'no-store' });
      // The fragment is rendered and escaped by the daemon.
      stats.innerHTML = await r.text();
      conn.textContent = r.ok ? 'updated ' + new Date().toLocaleTimeString() : 'error ' + r.status;
    } catch (e) {
      conn.textContent = 'daemon unreachable';
    }
  }
  refresh();
  setInterval(refresh, 2000);

  const form = document.getElementById('measure');
  const result = document.getElementById('measure-result');
  const button = document.getElementById('measure-button');
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const image = document.getElementById('image').value.trim();
    if (!image) return;
    button.disabled = true;
    result.textContent = 'Measuring…';
    try {
      const r = await fetch('/debug/web/measure?image=' + encodeURIComponent(image), { cache: 'no-store' });
      result.innerHTML = await r.text();
      result.dataset.status = String(r.status);
    } catch (e) {
      result.textContent = 'request failed: ' + e;
      result.dataset.status = 'error';
    } finally {
      button.disabled = false;
      result.dataset.done = '1';
    }
  });
})();
