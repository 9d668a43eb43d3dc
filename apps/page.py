"""The web chat page `qrb serve` serves at `/`: static HTML + a script that streams from /v1/chat/completions.

An API key the user types is kept in the tab's sessionStorage only (gone when the tab closes; never localStorage or a
cookie) and sent as `Authorization: Bearer <key>`: the served HTML says only *whether* a key is needed. With `--rag`,
a reply's `citations` (its sources chunk's delta) show under it as DOI links in place of the plain "Sources:" line.
"""
from __future__ import annotations

import html
import json

KEY_STORE = "qrb-api-key"  # the sessionStorage item


def page_html(model_id: str, max_tokens: int, *, key_required: bool, base_only: bool, rag: bool = False) -> str:
    which = ("the base model alone (no fine-tuned adapter), for comparison with the fine-tuned model" if base_only
             else "the fine-tuned model") + (", from the papers it retrieves (linked under each answer)" if rag else "")
    return (PAGE.replace("__MODEL_JS__", json.dumps(model_id)).replace("__MODEL__", html.escape(model_id))
            .replace("__MAX_TOKENS__", str(int(max_tokens))).replace("__WHICH__", which)
            .replace("__TITLE__", "Quantum Research Bot" + (" (base model)" if base_only else ""))
            .replace("__KEY_REQUIRED__", json.dumps(bool(key_required)))
            .replace("__KEY_STORE__", json.dumps(KEY_STORE)))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
 body{font-family:system-ui,sans-serif;max-width:48rem;margin:0 auto;padding:1rem;background:#fafafa;color:#222}
 h1{font-size:1.3rem} #log{display:flex;flex-direction:column;gap:.6rem;margin-bottom:1rem}
 .msg{padding:.6rem .8rem;border-radius:.5rem;white-space:pre-wrap;line-height:1.4}
 .user{background:#dbeafe;align-self:flex-end;max-width:85%} .assistant{background:#fff;border:1px solid #ddd}
 .error{background:#fee2e2} form{display:flex;gap:.5rem} textarea{flex:1;font:inherit;padding:.5rem;min-height:3rem}
 button{font:inherit;padding:.5rem 1rem} small{color:#666} [hidden]{display:none !important}
 #key-row{margin-bottom:1rem} #api-key{font:inherit;padding:.3rem;width:20rem;max-width:100%}
 .sources{font-size:.85rem;color:#444;margin-top:-.3rem}
</style></head>
<body>
<h1>__TITLE__</h1>
<p><small>Answers questions about recent papers in <i>Quantum</i> with __WHICH__ (model <code>__MODEL__</code>,
replies up to __MAX_TOKENS__ tokens). Generated text can be wrong: check the papers. Enter sends, Shift+Enter adds
a line.</small></p>
<div id="key-row" hidden><label for="api-key">API key</label>
<input id="api-key" type="password" autocomplete="off" spellcheck="false" placeholder="the server's QRB_SERVE_API_KEY">
<small>kept in this tab only (sessionStorage), sent as a Bearer token</small></div>
<div id="log" aria-live="polite"></div>
<form id="form"><textarea id="input" placeholder="Ask about a paper..." required></textarea>
<button id="send" type="submit">Send</button> <button id="reset" type="button">New chat</button></form>
<script>
const KEY_REQUIRED = __KEY_REQUIRED__, KEY_STORE = __KEY_STORE__;
const log = document.getElementById('log'), input = document.getElementById('input');
const send = document.getElementById('send');
const keyRow = document.getElementById('key-row'), keyInput = document.getElementById('api-key');
let history = [];
function storage() { try { return window.sessionStorage; } catch (e) { return null; } }
keyInput.value = (storage() && storage().getItem(KEY_STORE)) || '';
keyRow.hidden = !KEY_REQUIRED;
keyInput.addEventListener('input', () => {
  const s = storage(); if (!s) return;
  if (keyInput.value) s.setItem(KEY_STORE, keyInput.value); else s.removeItem(KEY_STORE);
});
function bubble(role, text) {
  const d = document.createElement('div'); d.className = 'msg ' + role; d.textContent = text;
  log.appendChild(d); d.scrollIntoView(); return d;
}
function sources(after, cites) {
  const d = document.createElement('div'); d.className = 'sources'; d.append('Sources: ');
  cites.forEach((c, i) => {
    const a = document.createElement('a'); a.textContent = c.title || c.doi; a.target = '_blank'; a.rel = 'noopener';
    if (/^https?:/.test(c.url || '')) a.href = c.url;
    if (i) d.append('; '); d.append(a);
  });
  after.after(d);
}
async function ask(question) {
  history.push({role: 'user', content: question});
  bubble('user', question);
  const out = bubble('assistant', ''); out.dataset.done = 'false'; send.disabled = true;
  let focus = input;
  try {
    const headers = {'Content-Type': 'application/json'}, key = keyInput.value.trim();
    if (key) headers['Authorization'] = 'Bearer ' + key;
    const r = await fetch('v1/chat/completions', {method: 'POST', headers: headers,
      body: JSON.stringify({model: __MODEL_JS__, messages: history, stream: true})});
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      let msg = (e.error && e.error.message) || r.statusText;
      if (r.status === 401) {
        keyRow.hidden = false; focus = keyInput;
        msg = key ? 'the server refused this API key: check the key field above'
                  : 'this server needs an API key (QRB_SERVE_API_KEY): enter it in the key field above';
      }
      throw new Error(msg);
    }
    const reader = r.body.getReader(), dec = new TextDecoder(); let buf = '';
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true}); let i;
      while ((i = buf.indexOf('\\n\\n')) >= 0) {
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim(); if (data === '[DONE]') continue;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        const d = (obj.choices && obj.choices[0] && obj.choices[0].delta) || {};
        if (d.citations) sources(out, d.citations); else if (d.content) out.textContent += d.content;
      }
    }
    history.push({role: 'assistant', content: out.textContent});
  } catch (e) {
    history.pop(); out.className = 'msg error'; out.textContent = 'Error: ' + e.message;
  } finally { out.dataset.done = 'true'; send.disabled = false; focus.focus(); }
}
document.getElementById('form').addEventListener('submit', ev => {
  ev.preventDefault(); const q = input.value.trim(); if (!q || send.disabled) return; input.value = ''; ask(q);
});
input.addEventListener('keydown', ev => {
  if (ev.key === 'Enter' && !ev.shiftKey) { ev.preventDefault(); document.getElementById('form').requestSubmit(); }
});
document.getElementById('reset').addEventListener('click', () => { history = []; log.innerHTML = ''; });
</script>
</body></html>
"""
