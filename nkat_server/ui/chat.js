// NKAT's built-in chat page: chat and raw-completion modes over the server's OpenAI routes,
// streamed with fetch + ReadableStream (Server-Sent Events parsed here). Model output only ever
// reaches the page as text (textContent / a textarea's value), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SAMPLERS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens"];
  const INTEGERS = new Set(["top_k", "max_tokens"]);
  const KEYS = { settings: "nkat.settings", apiKey: "nkat.apiKey", mode: "nkat.mode", model: "nkat.model" };

  const ui = {
    log: $("log"), hint: $("empty-hint"), chatView: $("chat-view"), rawView: $("raw-view"), raw: $("raw-text"),
    input: $("input"), composer: $("composer"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
    status: $("status"), error: $("error"), picker: $("model-picker"), model: $("model"), modelName: $("model-name"),
    apiKey: $("api-key"), system: $("system"), settings: $("settings"), reset: $("reset"),
  };

  const state = { mode: "chat", messages: [], controller: null, singleModel: null };

  const store = {
    get(key) { try { return localStorage.getItem(key); } catch { return null; } },
    set(key, value) { try { localStorage.setItem(key, value); } catch { /* storage off: settings not kept */ } },
    remove(key) { try { localStorage.removeItem(key); } catch { /* as above */ } },
  };

  // --- settings ---------------------------------------------------------------------------------
  function loadSettings() {
    let saved = {};
    try { saved = JSON.parse(store.get(KEYS.settings) || "{}") || {}; } catch { saved = {}; }
    for (const id of SAMPLERS) if (typeof saved[id] === "string") $(id).value = saved[id];
    if (typeof saved.system === "string") ui.system.value = saved.system;
    ui.apiKey.value = store.get(KEYS.apiKey) || "";
    setMode(store.get(KEYS.mode) === "raw" ? "raw" : "chat");
  }

  function saveSettings() {
    const out = { system: ui.system.value };
    for (const id of SAMPLERS) out[id] = $(id).value;
    store.set(KEYS.settings, JSON.stringify(out));
    const key = ui.apiKey.value.trim();
    if (key) store.set(KEYS.apiKey, key); else store.remove(KEYS.apiKey);
  }

  function samplerFields() {
    const out = {};
    for (const id of SAMPLERS) {
      const text = $(id).value.trim();
      const value = Number(text);
      if (text === "" || !Number.isFinite(value)) continue;  // left empty: the server's default
      out[id] = INTEGERS.has(id) ? Math.round(value) : value;
    }
    return out;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = ui.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function modelField() {
    if (!ui.picker.hidden && ui.model.value) return { model: ui.model.value };
    return state.singleModel ? { model: state.singleModel } : {};
  }

  // --- messages and status ----------------------------------------------------------------------
  function showError(message) { ui.error.textContent = message; ui.error.hidden = false; }
  function clearError() { ui.error.textContent = ""; ui.error.hidden = true; }

  async function errorMessage(resp) {
    let text = "";
    try { text = await resp.text(); } catch { /* body unreadable: the status alone */ }
    let detail = "";
    try {
      const body = JSON.parse(text);
      const err = body && (body.error || body.detail);
      detail = typeof err === "string" ? err : (err && (err.message || err.msg)) || "";
    } catch { detail = text.slice(0, 300); }
    if (resp.status === 401) {
      return ui.apiKey.value.trim()
        ? "The server refused the API key (401). Check the key under Settings."
        : "This server needs an API key (401): enter it under Settings → API key.";
    }
    return `Error ${resp.status}${detail ? ": " + detail : " " + (resp.statusText || "(no details)")}`;
  }

  const tokens = (n) => `${n} token${n === 1 ? "" : "s"}`;

  function nearBottom(node) { return node.scrollHeight - node.scrollTop - node.clientHeight < 80; }

  function addMessage(role, text) {
    ui.hint.hidden = true;
    const node = document.createElement("div");
    node.className = "msg " + role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const thinking = document.createElement("span");
    thinking.className = "thinking";
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    const stats = document.createElement("span");
    stats.className = "stats";
    node.append(who, thinking, body, stats);
    ui.log.append(node);
    ui.log.scrollTop = ui.log.scrollHeight;
    return { node, thinking, body, stats };
  }

  function describe(result, stopped) {
    const n = result.usage && Number.isFinite(result.usage.completion_tokens)
      ? result.usage.completion_tokens : result.pieces;
    const parts = [`${stopped && !result.usage ? "≈" : ""}${tokens(n)}`];
    if (n > 1 && result.last > result.first) {
      parts.push(`${((n - 1) / ((result.last - result.first) / 1000)).toFixed(1)} tok/s`);
    }
    if (result.first !== null) parts.push(`first token after ${((result.first - result.start) / 1000).toFixed(2)} s`);
    if (stopped) parts.push("stopped");
    else if (result.finish === "length") parts.push("reached max tokens");
    return parts.join(" · ");
  }

  function setBusy(busy) {
    document.body.dataset.state = busy ? "generating" : "idle";
    ui.send.disabled = busy;
    ui.stop.hidden = !busy;
    ui.newChat.disabled = busy;
    ui.raw.readOnly = busy;
    for (const radio of document.querySelectorAll('input[name="mode"]')) radio.disabled = busy;
    if (busy) ui.stop.focus();
  }

  // --- streaming --------------------------------------------------------------------------------
  async function* sseEvents(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r/g, "");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;  // a keep-alive comment
        if (data === "[DONE]") return;
        let event;
        try { event = JSON.parse(data); } catch { throw new Error("the stream sent something that is not JSON"); }
        if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
        yield event;
      }
    }
  }

  // POST a streaming request; onPiece(text, thinking) gets each piece of the reply.
  async function streamRequest(path, body, chat, onPiece) {
    const result = { start: performance.now(), first: null, last: null, pieces: 0, usage: null, finish: null };
    state.controller = new AbortController();
    const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    for await (const event of sseEvents(resp)) {
      if (event.usage) result.usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      const thinking = chat ? (choice.delta && choice.delta.reasoning_content) || "" : "";
      if (piece || thinking) {
        const now = performance.now();
        if (result.first === null) result.first = now;
        result.last = now;
        result.pieces += 1;
        onPiece(piece, thinking);
      }
      if (choice.finish_reason) result.finish = choice.finish_reason;
    }
    return result;
  }

  function failure(err) {
    if (err instanceof TypeError) return "Could not reach the server (" + err.message + ").";
    return err.message || String(err);
  }

  async function sendChat() {
    const text = ui.input.value;
    if (!text.trim()) { ui.input.focus(); return; }
    ui.input.value = "";
    state.messages.push({ role: "user", content: text });
    const user = addMessage("user", text);
    const bot = addMessage("assistant", "");
    bot.node.classList.add("generating");
    const system = ui.system.value.trim();
    const body = { messages: system ? [{ role: "system", content: system }, ...state.messages] : state.messages,
      stream: true, stream_options: { include_usage: true }, ...samplerFields(), ...modelField() };
    let reply = "";
    const partial = { start: performance.now(), first: null, last: null, pieces: 0, usage: null };
    try {
      const result = await streamRequest("/v1/chat/completions", body, true, (piece, thinking) => {
        const follow = nearBottom(ui.log);
        reply += piece;
        bot.body.textContent = reply;
        if (thinking) bot.thinking.textContent += thinking;
        partial.pieces += 1;
        if (follow) ui.log.scrollTop = ui.log.scrollHeight;
      });
      state.messages.push({ role: "assistant", content: reply });
      bot.stats.textContent = ui.status.textContent = describe(result, false);
    } catch (err) {
      if (err.name === "AbortError" && reply) {  // stopped: keep what came
        state.messages.push({ role: "assistant", content: reply });
        bot.stats.textContent = ui.status.textContent = `Stopped after ≈${tokens(partial.pieces)}`;
      } else {  // nothing came: take the turn back so it can be sent again
        state.messages.pop();
        user.node.remove();
        bot.node.remove();
        ui.input.value = text;
        ui.hint.hidden = state.messages.length > 0;
        if (err.name === "AbortError") ui.status.textContent = "Stopped before the reply began";
        else showError(failure(err));
      }
    } finally {
      bot.node.classList.remove("generating");
    }
  }

  async function sendRaw() {
    const prompt = ui.raw.value;
    if (!prompt) { showError("Write the beginning of a text first: Generate continues it."); return; }
    const body = { prompt, stream: true, stream_options: { include_usage: true }, ...samplerFields(), ...modelField() };
    let pieces = 0;
    try {
      const result = await streamRequest("/v1/completions", body, false, (piece) => {
        const follow = nearBottom(ui.raw);
        ui.raw.value += piece;
        pieces += 1;
        if (follow) ui.raw.scrollTop = ui.raw.scrollHeight;
      });
      ui.status.textContent = describe(result, false);
    } catch (err) {
      if (err.name === "AbortError") ui.status.textContent = `Stopped after ≈${tokens(pieces)}`;
      else showError(failure(err));
    }
  }

  async function send() {
    if (state.controller) return;
    clearError();
    ui.status.textContent = "Generating…";
    setBusy(true);
    try {
      await (state.mode === "chat" ? sendChat() : sendRaw());
    } finally {
      state.controller = null;
      setBusy(false);
      if (ui.status.textContent === "Generating…") ui.status.textContent = "";
      (state.mode === "chat" ? ui.input : ui.raw).focus();
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  // --- models, modes ----------------------------------------------------------------------------
  async function loadModels() {
    let data;
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (!resp.ok) { showError(await errorMessage(resp)); return; }
      data = (await resp.json()).data || [];
    } catch (err) {
      showError(failure(err));
      return;
    }
    if (data.length === 1) {
      state.singleModel = data[0].id;
      ui.modelName.textContent = data[0].id;
    }
    ui.picker.hidden = data.length < 2;
    if (data.length < 2) return;
    const chosen = ui.model.value || store.get(KEYS.model);
    ui.model.replaceChildren(...data.map((m) => {
      const status = m.status && m.status.value;
      return new Option(status && status !== "loaded" ? `${m.id} (${status})` : m.id, m.id);
    }));
    if (chosen && data.some((m) => m.id === chosen)) ui.model.value = chosen;
  }

  function setMode(mode) {
    state.mode = mode;
    for (const radio of document.querySelectorAll('input[name="mode"]')) radio.checked = radio.value === mode;
    ui.chatView.hidden = mode !== "chat";
    ui.rawView.hidden = mode !== "raw";
    ui.input.hidden = mode !== "chat";
    ui.send.textContent = mode === "chat" ? "Send" : "Generate";
    ui.newChat.textContent = mode === "chat" ? "New chat" : "Clear text";
    store.set(KEYS.mode, mode);
  }

  function newChat() {
    if (state.mode === "raw") {
      ui.raw.value = "";
      ui.raw.focus();
    } else {
      state.messages = [];
      ui.log.replaceChildren(ui.hint);
      ui.hint.hidden = false;
      ui.input.focus();
    }
    ui.status.textContent = "";
    clearError();
  }

  // --- wiring -----------------------------------------------------------------------------------
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  ui.raw.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => { if (radio.checked) setMode(radio.value); });
  }
  ui.model.addEventListener("change", () => store.set(KEYS.model, ui.model.value));
  ui.model.addEventListener("focus", loadModels);  // statuses change while models load
  ui.settings.addEventListener("input", saveSettings);
  ui.apiKey.addEventListener("change", () => { clearError(); loadModels(); });
  ui.reset.addEventListener("click", () => {
    for (const id of SAMPLERS) $(id).value = $(id).defaultValue;
    ui.system.value = "";
    saveSettings();
  });

  loadSettings();
  ui.settings.open = window.matchMedia("(min-width: 761px)").matches;
  setBusy(false);
  loadModels();
})();
