// Spegel /visualize: live request graph, feed, peer table and pulls. Everything arrives from
// the daemon itself (state snapshot, then Server-Sent Events); no other origin is contacted.
'use strict';
(function () {
  // The SVG namespace name: an identifier, never fetched.
  const SVG = 'http://www.w3.org/2000/svg';
  const MAX_FEED_ROWS = 300;
  const MAX_PULLS = 20;
  const PULL_GAP_MS = 30000;
  const COLORS = { served: '#16a34a', forwarded: '#2563eb', fallback: '#ea8c00', failed: '#dc2626' };

  const S = { node: { id: '', addrs: [] }, peers: [], preferred: null, events: new Map(), capacity: 1000, images: new Set() };
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    if (attrs) for (const k in attrs) if (attrs[k] !== undefined && attrs[k] !== null) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmtBytes(n) {
    if (n < 1024) return n + ' B';
    const u = ['KB', 'MB', 'GB', 'TB'];
    let v = n / 1024, i = 0;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return v.toFixed(1) + ' ' + u[i];
  }
  function fmtMs(ms) {
    if (ms === null || ms === undefined) return '–';
    if (ms < 1) return '<1 ms';
    if (ms < 1000) return ms.toFixed(ms < 10 ? 1 : 0) + ' ms';
    return (ms / 1000).toFixed(2) + ' s';
  }
  function short(id) { return id ? (id.length > 10 ? '…' + id.slice(-8) : id) : ''; }
  function shortRef(r) { return r.startsWith('sha256:') ? r.slice(0, 19) + '…' : r; }
  function image(e) { return e.registry + '/' + e.repository; }

  function ipToPeer() {
    const m = new Map();
    for (const p of S.peers) for (const ip of p.ips || []) m.set(ip, p.id);
    return m;
  }
  // The other side of an event: for outgoing fetches the peer; for incoming requests the
  // peer that sent it, or this node's own clients (containerd).
  function counterpart(e, ips) {
    if (e.direction === 'out') return e.peer || ('ip:' + (e.remote || '?'));
    const p = e.remote ? ips.get(e.remote) : undefined;
    return p || 'clients';
  }

  function addEvent(e) {
    if (S.events.has(e.id)) return;
    S.events.set(e.id, e);
    while (S.events.size > S.capacity) S.events.delete(S.events.keys().next().value);
    if (!S.images.has(image(e))) {
      S.images.add(image(e));
      $('filter-image').appendChild(el('option', { value: image(e) }, image(e)));
    }
  }

  function filtered() {
    const dir = $('filter-dir').value;
    const img = $('filter-image').value;
    const out = [];
    for (const e of S.events.values()) {
      if (dir !== 'both' && e.direction !== dir) continue;
      if (img && image(e) !== img) continue;
      out.push(e);
    }
    return out;
  }

  // ---- graph ----
  function layout(peerIds) {
    const pos = new Map();
    const cx = 320, cy = 190;
    pos.set('self', { x: cx, y: cy, label: 'this node', sub: short(S.node.id) });
    pos.set('upstream', { x: cx, y: 32, label: 'upstream', sub: 'registry (fallback)' });
    pos.set('clients', { x: cx, y: 322, label: 'containerd', sub: 'local clients' });
    const n = peerIds.length;
    peerIds.forEach((id, i) => {
      // Peers on the left and right arcs, away from upstream (top) and clients (bottom).
      const side = i % 2 === 0 ? 1 : -1;
      const k = Math.floor(i / 2), per = Math.ceil(n / 2);
      const a = (-0.8 + 1.6 * (per === 1 ? 0.5 : k / (per - 1))) * (Math.PI / 2) * 0.9;
      const p = S.peers.find((q) => q.id === id);
      pos.set(id, { x: cx + side * 230 * Math.cos(a), y: cy + 150 * Math.sin(a), label: 'peer ' + short(id), sub: p && p.ips && p.ips[0] ? p.ips[0] : '', peer: id });
    });
    return pos;
  }

  function edgesOf(events) {
    const ips = ipToPeer();
    const edges = new Map();
    const add = (key, from, to, dir, peer, e, bytes) => {
      let g = edges.get(key);
      if (!g) { g = { key, from, to, dir, peer, count: 0, bytes: 0, outcomes: {}, last: null }; edges.set(key, g); }
      g.count++; g.bytes += bytes; g.outcomes[e.outcome] = (g.outcomes[e.outcome] || 0) + 1; g.last = e.outcome;
    };
    for (const e of events) {
      const other = counterpart(e, ips);
      if (e.direction === 'out') {
        add('out:' + other, other, 'self', 'out', other, e, e.bytes);
      } else {
        add('in:' + other + ':' + e.outcome, other, 'self', 'in', other === 'clients' ? '' : other, e, e.bytes);
        if (e.outcome === 'fallback') add('fallback', 'self', 'upstream', 'in', '', e, 0);
      }
    }
    return [...edges.values()];
  }

  function drawGraph(events) {
    const g = $('graph');
    while (g.firstChild) g.removeChild(g.firstChild);
    const ips = ipToPeer();
    const peerIds = S.peers.map((p) => p.id);
    for (const e of events) { const c = counterpart(e, ips); if (c !== 'clients' && !peerIds.includes(c)) peerIds.push(c); }
    const pos = layout(peerIds);
    const edges = edgesOf(events);
    const defs = svg('defs', {});
    for (const o in COLORS) {
      const m = svg('marker', { id: 'arrow-' + o, viewBox: '0 0 10 10', refX: '9', refY: '5', markerWidth: '5', markerHeight: '5', orient: 'auto-start-reverse' });
      m.appendChild(svg('path', { d: 'M0,0 L10,5 L0,10 z', fill: COLORS[o] }));
      defs.appendChild(m);
    }
    g.appendChild(defs);
    const pairs = new Map();
    for (const ed of edges) {
      const a = pos.get(ed.from), b = pos.get(ed.to);
      if (!a || !b) continue;
      const pk = [ed.from, ed.to].sort().join('|');
      const nth = pairs.get(pk) || 0; pairs.set(pk, nth + 1);
      const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
      const bend = (nth % 2 === 0 ? 1 : -1) * (14 + 12 * Math.floor(nth / 2)) * (ed.dir === 'out' ? 1 : -1);
      const mx = (a.x + b.x) / 2 - dy / len * bend, my = (a.y + b.y) / 2 + dx / len * bend;
      const r = 30;
      const sx = a.x + dx / len * r, sy = a.y + dy / len * r, ex = b.x - dx / len * r, ey = b.y - dy / len * r;
      // Colour: failures win, else the most frequent outcome.
      let outcome = ed.last;
      let best = -1;
      for (const o in ed.outcomes) if (ed.outcomes[o] > best) { best = ed.outcomes[o]; outcome = o; }
      if (ed.outcomes.failed) outcome = 'failed';
      const width = ed.bytes > 0 ? Math.min(12, 1.5 + Math.log2(1 + ed.bytes / 4096)) : 1.5;
      const grp = svg('g', { class: 'edge', 'data-key': ed.key, 'data-dir': ed.dir, 'data-peer': ed.peer || '', 'data-outcome': outcome, 'data-count': String(ed.count), 'data-bytes': String(ed.bytes) });
      const path = svg('path', { d: `M${sx},${sy} Q${mx},${my} ${ex},${ey}`, fill: 'none', stroke: COLORS[outcome] || '#888', 'stroke-width': width.toFixed(1), 'stroke-opacity': '0.8', 'marker-end': 'url(#arrow-' + (COLORS[outcome] ? outcome : 'served') + ')' });
      if (ed.key === 'fallback') path.setAttribute('stroke-dasharray', '5 4');
      grp.appendChild(path);
      grp.appendChild(svg('title', {}, `${ed.count} requests, ${fmtBytes(ed.bytes)} (${Object.entries(ed.outcomes).map(([k, v]) => k + ' ' + v).join(', ')})`));
      grp.appendChild(svg('text', { x: (mx).toFixed(0), y: (my).toFixed(0), 'text-anchor': 'middle' }, `${ed.count}× ${ed.bytes ? fmtBytes(ed.bytes) : ''}`));
      g.appendChild(grp);
    }
    for (const [id, p] of pos) {
      const isSelf = id === 'self';
      const grp = svg('g', { class: 'node', 'data-node': id });
      const fill = isSelf ? '#10243e' : id === 'upstream' ? '#fff4e0' : id === 'clients' ? '#eef2f7' : (S.preferred === id ? '#dbeafe' : '#eef4ff');
      grp.appendChild(svg('circle', { cx: p.x.toFixed(0), cy: p.y.toFixed(0), r: isSelf ? '30' : '24', fill, stroke: isSelf ? '#10243e' : '#8aa0c0', 'stroke-width': '1.5' }));
      const t = svg('text', { x: p.x.toFixed(0), y: (p.y + (isSelf ? 4 : 3)).toFixed(0), 'text-anchor': 'middle' }, isSelf ? 'this node' : (id === 'upstream' ? 'upstream' : id === 'clients' ? 'clients' : 'peer'));
      if (isSelf) t.setAttribute('fill', '#fff');
      grp.appendChild(t);
      const under = isSelf ? short(S.node.id) : p.peer ? (S.preferred === id ? '★ ' : '') + short(id) : p.sub;
      grp.appendChild(svg('text', { x: p.x.toFixed(0), y: (p.y + (isSelf ? 44 : 38)).toFixed(0), 'text-anchor': 'middle', class: 'mono' }, under));
      if (p.peer && p.sub) grp.appendChild(svg('text', { x: p.x.toFixed(0), y: (p.y + 51).toFixed(0), 'text-anchor': 'middle', fill: '#6b7280' }, p.sub));
      g.appendChild(grp);
    }
  }

  // ---- feed ----
  function drawFeed(events) {
    const ips = ipToPeer();
    const body = $('feed').tBodies[0];
    while (body.firstChild) body.removeChild(body.firstChild);
    const rows = events.slice(-MAX_FEED_ROWS).reverse();
    for (const e of rows) {
      const peer = e.direction === 'out' ? e.peer : (e.peer || (e.remote ? ips.get(e.remote) : '') || '');
      const tr = el('tr', { 'data-id': String(e.id), 'data-dir': e.direction, 'data-outcome': e.outcome, 'data-peer': peer || '', 'data-image': image(e) });
      tr.appendChild(el('td', null, new Date(e.time_ms).toLocaleTimeString()));
      tr.appendChild(el('td', null, e.direction === 'in' ? '← in' : '→ out'));
      tr.appendChild(el('td', null, (e.head ? 'HEAD ' : '') + e.kind.replace(/s$/, '')));
      tr.appendChild(el('td', { class: 'mono', title: image(e) + ' ' + e.reference }, e.repository + ' ' + shortRef(e.reference)));
      tr.appendChild(el('td', { class: 'mono', title: peer || e.remote || '' }, peer ? short(peer) : (e.remote || '')));
      tr.appendChild(el('td', null, String(e.status)));
      tr.appendChild(el('td', { class: 'o-' + e.outcome }, e.outcome));
      tr.appendChild(el('td', null, fmtBytes(e.bytes)));
      tr.appendChild(el('td', null, fmtMs(e.duration_ms)));
      tr.appendChild(el('td', null, [e.hedged ? 'hedged' : '', e.resumed ? 'resumed' : '', e.waited_ms > 0 ? 'waited ' + Math.round(e.waited_ms) + ' ms' : ''].filter(Boolean).join(' ')));
      body.appendChild(tr);
    }
    $('feed-count').textContent = String(events.length);
  }

  // ---- pulls: this node's clients' requests grouped per image ----
  function drawPulls() {
    const ips = ipToPeer();
    const pulls = [];
    const open = new Map();
    for (const e of S.events.values()) {
      if (e.direction !== 'in' || counterpart(e, ips) !== 'clients') continue;
      const key = image(e);
      let p = open.get(key);
      const byTag = e.kind.startsWith('manifest') && !e.reference.startsWith('sha256:');
      if (!p || byTag && p.items.some((i) => !i.kind.startsWith('manifest')) || e.time_ms - p.last > PULL_GAP_MS) {
        p = { image: key, tag: '', start: e.time_ms, last: e.time_ms, items: [] };
        open.set(key, p); pulls.push(p);
      }
      if (byTag && !p.tag) p.tag = e.reference;
      p.last = Math.max(p.last, e.time_ms + e.duration_ms);
      p.items.push(e);
    }
    const box = $('pulls');
    while (box.firstChild) box.removeChild(box.firstChild);
    if (!pulls.length) { box.appendChild(el('p', { class: 'muted' }, 'No pulls seen yet.')); return; }
    for (const p of pulls.slice(-MAX_PULLS).reverse()) {
      const bytes = p.items.reduce((s, i) => s + (i.head ? 0 : i.bytes), 0);
      const d = el('details', { class: 'pull', 'data-image': p.image, open: '' });
      d.appendChild(el('summary', null, `${p.image}${p.tag ? ':' + p.tag : ''} — ${new Date(p.start).toLocaleTimeString()}, ${p.items.length} requests, ${fmtBytes(bytes)}, ${fmtMs(p.last - p.start)}`));
      const t = el('table');
      const h = el('tr'); for (const c of ['+t', 'Kind', 'Digest', 'Size', 'Duration', 'Source']) h.appendChild(el('th', null, c));
      t.appendChild(h);
      for (const i of p.items) {
        const src = i.outcome === 'served' ? 'local' : i.outcome === 'forwarded' ? 'peer ' + short(i.peer || '') : i.outcome === 'fallback' ? 'upstream (fallback)' : 'failed';
        const tr = el('tr', { 'data-source': i.outcome === 'forwarded' ? (i.peer || '') : i.outcome });
        tr.appendChild(el('td', null, '+' + fmtMs(i.time_ms - p.start)));
        tr.appendChild(el('td', null, (i.head ? 'HEAD ' : '') + i.kind.replace(/s$/, '')));
        tr.appendChild(el('td', { class: 'mono' }, shortRef(i.reference)));
        tr.appendChild(el('td', null, i.head ? '–' : fmtBytes(i.bytes)));
        tr.appendChild(el('td', null, fmtMs(i.duration_ms)));
        tr.appendChild(el('td', { class: 'o-' + i.outcome, title: i.peer || '' }, src));
        t.appendChild(tr);
      }
      d.appendChild(t);
      box.appendChild(d);
    }
  }

  // ---- peers ----
  function drawPeers() {
    const body = $('peers').tBodies[0];
    while (body.firstChild) body.removeChild(body.firstChild);
    for (const p of S.peers) {
      const tr = el('tr', { 'data-peer': p.id, 'data-preferred': p.preferred ? '1' : '0' });
      tr.appendChild(el('td', { title: 'preferred by the selector' }, p.preferred ? '★' : ''));
      tr.appendChild(el('td', { class: 'mono', title: p.id }, short(p.id)));
      tr.appendChild(el('td', null, (p.ips || []).join(', ')));
      tr.appendChild(el('td', null, fmtMs(p.latency_ms)));
      tr.appendChild(el('td', null, p.throughput ? fmtBytes(p.throughput) + '/s' : '–'));
      tr.appendChild(el('td', null, String(p.inflight || 0)));
      tr.appendChild(el('td', null, String(p.fetches || 0)));
      tr.appendChild(el('td', { class: p.failures ? 'o-failed' : '' }, String(p.failures || 0)));
      tr.appendChild(el('td', null, fmtBytes(p.bytes_in || 0)));
      body.appendChild(tr);
    }
    if (!S.peers.length) {
      const tr = el('tr'); tr.appendChild(el('td', { colspan: '9' }, 'No connected peers.')); body.appendChild(tr);
    }
  }

  let pending = false;
  function render() {
    if (pending) return;
    pending = true;
    setTimeout(() => {
      pending = false;
      const events = filtered();
      drawGraph(events);
      drawFeed(events);
      drawPulls();
      drawPeers();
      document.body.dataset.rendered = String(S.events.size);
    }, 100);
  }

  async function loadState() {
    const r = await fetch('/visualize/state', { cache: 'no-store' });
    if (!r.ok) throw new Error('state ' + r.status);
    const st = await r.json();
    S.node = st.node; S.peers = st.peers || []; S.preferred = st.preferred; S.capacity = st.capacity || 1000;
    $('node-id').textContent = S.node.id;
    for (const e of st.events || []) addEvent(e);
    render();
  }

  function connect() {
    const es = new EventSource('/visualize/events');
    es.addEventListener('hello', () => { $('conn').textContent = 'live'; loadState().catch((e) => { $('conn').textContent = String(e); }); });
    es.addEventListener('request', (m) => { try { addEvent(JSON.parse(m.data)); render(); } catch (e) { /* malformed message: skip */ } });
    es.addEventListener('peers', (m) => { try { const d = JSON.parse(m.data); S.peers = d.peers || []; S.preferred = d.preferred; render(); } catch (e) { /* skip */ } });
    es.addEventListener('lagged', (m) => { $('conn').textContent = 'live (skipped ' + m.data + ' events)'; loadState().catch(() => {}); });
    es.onerror = () => { $('conn').textContent = 'reconnecting…'; };
  }

  $('filter-dir').addEventListener('change', render);
  $('filter-image').addEventListener('change', render);
  connect();
})();
