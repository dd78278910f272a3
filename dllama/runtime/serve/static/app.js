// The chat page of `dllama-run serve` (docs/API.md#the-chat-page): plain JavaScript, no build step,
// nothing fetched from outside the server. Conversations and settings live in localStorage.
"use strict";

const STORE = {conversations: "dllama.conversations", current: "dllama.current", settings: "dllama.settings"};
// sampling left empty is left to the server (its defaults suit the model it serves)
const SAMPLING = ["temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed"];
const WHOLE_NUMBERS = new Set(["top_k", "max_tokens", "seed"]);
const DEFAULTS = {system: "", ...Object.fromEntries(SAMPLING.map((name) => [name, ""])), stop_sequences: "",
                  api_key: ""};
const HEALTH_EVERY_MS = {ok: 5000, busy: 1000, down: 2000};  // by the last state seen
const SAVE_EVERY_MS = 1000;  // how often a streaming answer is written to localStorage

const $ = (id) => document.getElementById(id);
const state = {
  conversations: readStore(STORE.conversations, []),
  currentId: localStorage.getItem(STORE.current),
  settings: {...DEFAULTS, ...readStore(STORE.settings, {})},
  controller: null,   // the AbortController of the answer being streamed
  contextLength: null,
  health: null,  // the last /health body
  modelInfoAsked: false,  // GET /v1/models once, and again when the API key may have changed
  healthTimer: null,
};

// ------------------------------------------------------------------------------------------
// storage

function readStore(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function saveConversations() {
  localStorage.setItem(STORE.conversations, JSON.stringify(state.conversations));
  if (state.currentId) localStorage.setItem(STORE.current, state.currentId);
  else localStorage.removeItem(STORE.current);
}

function currentConversation() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function newConversation(firstQuestion) {
  const conversation = {id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`,
                        title: firstQuestion.trim().replace(/\s+/g, " ").slice(0, 60), messages: [],
                        updated: Date.now()};
  state.conversations.unshift(conversation);
  state.currentId = conversation.id;
  return conversation;
}

// ------------------------------------------------------------------------------------------
// the request

function authHeaders() {
  const key = state.settings.api_key.trim();
  return key ? {Authorization: `Bearer ${key}`} : {};
}

function numberOrNull(text) {
  if (text === "" || text === null || text === undefined) return null;
  const value = Number(text);
  return Number.isFinite(value) ? value : null;
}

function requestBody(conversation) {
  const s = state.settings;
  const messages = [];
  if (s.system.trim()) messages.push({role: "system", content: s.system});
  for (const m of conversation.messages) {
    if (m.role === "assistant" && !m.content) continue;  // an answer that failed before its first word
    messages.push({role: m.role, content: m.content});
  }
  const body = {messages, stream: true, stream_options: {include_usage: true}};
  for (const field of SAMPLING) {
    const value = numberOrNull(s[field]);
    if (value !== null) body[field] = WHOLE_NUMBERS.has(field) ? Math.round(value) : value;
  }
  const stops = s.stop_sequences.split("\n").filter((line) => line !== "").slice(0, 4);
  if (stops.length) body.stop = stops;
  return body;
}

// Server-sent events from a fetch body: yields each event's data (the text after "data: ").
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

async function errorText(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401) message += " (set the API key in Settings)";
  if (response.status === 429) message += " (the server is busy: try again in a moment)";
  return message;
}

async function send(question) {
  let conversation = currentConversation();
  if (!conversation) conversation = newConversation(question);
  conversation.messages.push({role: "user", content: question});
  const body = requestBody(conversation);
  const answer = {role: "assistant", content: "", stats: {state: "waiting"}};
  conversation.messages.push(answer);
  conversation.updated = Date.now();
  saveConversations();
  renderAll();

  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  const view = answerView(conversation);
  const started = performance.now();
  let firstAt = null;
  let pieces = 0;
  let usage = null;
  let finish = null;
  let savedAt = started;
  const stats = () => {
    const tokens = usage ? usage.completion_tokens : pieces;  // a piece of text is about a token
    const decodeS = firstAt === null ? 0 : (performance.now() - firstAt) / 1000;
    return {tokens, firstTokenS: firstAt === null ? null : (firstAt - started) / 1000,
            tokensPerS: tokens > 1 && decodeS > 0 ? (tokens - 1) / decodeS : null};
  };
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json", ...authHeaders()},
      body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) throw new Error(await errorText(response));
    answer.stats = {state: "streaming"};
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const text = choice.delta && choice.delta.content;
      if (text) {
        if (firstAt === null) firstAt = performance.now();
        pieces += 1;
        answer.content += text;
        answer.stats = {state: "streaming", ...stats()};
        view.update(answer);
        if (performance.now() - savedAt > SAVE_EVERY_MS) {  // a tab closed mid-answer keeps what came
          saveConversations();
          savedAt = performance.now();
        }
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (finish === null) throw new Error("the connection closed before the answer was complete");
    answer.stats = {state: finish === "length" ? "length" : "done", ...stats()};
  } catch (error) {
    if (error.name === "AbortError") {
      answer.stats = {state: "stopped", ...stats()};
    } else {
      answer.stats = {state: "error", ...stats()};
      answer.error = error.message || String(error);
    }
  } finally {
    state.controller = null;
    conversation.updated = Date.now();
    saveConversations();
    view.update(answer);
    setStreaming(false);
    renderSidebar();
    refreshHealth();
  }
}

function stop() {
  if (state.controller) state.controller.abort();  // closes the connection: the server stops at the next token
}

// ------------------------------------------------------------------------------------------
// rendering

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A little markdown, built as DOM nodes (never innerHTML): ``` fences, `code` and **bold**.
function renderText(container, text) {
  container.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const newline = part.indexOf("\n");
      const code = newline >= 0 && /^[\w+-]*$/.test(part.slice(0, newline)) ? part.slice(newline + 1) : part;
      const pre = element("pre");
      pre.appendChild(element("code", "", code.replace(/\n$/, "")));
      container.appendChild(pre);
      return;
    }
    let prose = part;
    if (i > 0) prose = prose.replace(/^\n+/, "");  // the fences' own line breaks: the <pre> is a block already
    if (i < parts.length - 1) prose = prose.replace(/\n+$/, "");
    for (const piece of prose.split(/(`[^`\n]+`|\*\*[^*\n]+\*\*)/)) {
      if (!piece) continue;
      if (piece.startsWith("`") && piece.endsWith("`") && piece.length > 2) {
        container.appendChild(element("code", "", piece.slice(1, -1)));
      } else if (piece.startsWith("**") && piece.endsWith("**") && piece.length > 4) {
        container.appendChild(element("strong", "", piece.slice(2, -2)));
      } else {
        container.appendChild(document.createTextNode(piece));
      }
    }
  });
}

function statsText(stats) {
  if (!stats) return "";
  const words = {waiting: "waiting for the model…", streaming: "", done: "", length: "cut at max tokens",
                 stopped: "stopped", error: "failed"};
  const parts = [];
  if (stats.tokens) parts.push(`${stats.tokens} tokens`);
  if (stats.tokensPerS) parts.push(`${stats.tokensPerS.toFixed(1)} tok/s`);
  if (stats.firstTokenS !== null && stats.firstTokenS !== undefined) parts.push(`first token ${stats.firstTokenS.toFixed(2)} s`);
  if (words[stats.state]) parts.push(words[stats.state]);
  return parts.join(" · ");
}

function messageView(message) {
  const row = element("div", `message ${message.role}`);
  const bubble = element("div", "bubble");
  const text = element("div", "text");
  const meta = element("div", "meta");
  bubble.append(text);
  row.append(bubble, meta);
  const update = (m) => {
    renderText(text, m.content);
    const phase = m.stats ? m.stats.state : "done";
    row.dataset.state = phase;
    bubble.classList.toggle("pending", !m.content && ["waiting", "streaming"].includes(phase));
    bubble.hidden = !m.content && phase === "error";
    meta.replaceChildren();
    if (m.role === "assistant") {
      if (m.error) meta.appendChild(element("div", "error", m.error));
      meta.appendChild(element("span", "stats", statsText(m.stats)));
    }
    scrollToEnd();
  };
  update(message);
  return {row, update};
}

let stickToEnd = true;

function scrollToEnd() {
  const box = $("messages");
  if (stickToEnd) box.scrollTop = box.scrollHeight;
}

// Updates the conversation's newest answer on screen, found anew each time: the list may have been
// redrawn meanwhile (a conversation deleted from the sidebar).
function answerView(conversation) {
  return {update: (m) => {
    if (conversation.id !== state.currentId) return;
    const rows = $("messages").querySelectorAll(".message.assistant");
    if (rows.length) rows[rows.length - 1].view.update(m);
  }};
}

function renderMessages() {
  const box = $("messages");
  const conversation = currentConversation();
  box.querySelectorAll(".message").forEach((node) => node.remove());
  $("empty").hidden = Boolean(conversation && conversation.messages.length);
  $("chat-title").textContent = conversation ? conversation.title : "New chat";
  if (!conversation) return;
  for (const message of conversation.messages) {
    const view = messageView(message);
    view.row.view = view;
    box.appendChild(view.row);
  }
  stickToEnd = true;
  scrollToEnd();
}

function renderSidebar() {
  const nav = $("conversations");
  nav.replaceChildren();
  const sorted = [...state.conversations].sort((a, b) => b.updated - a.updated);
  for (const conversation of sorted) {
    const item = element("div", `conversation${conversation.id === state.currentId ? " active" : ""}`);
    const open = element("button", "open", conversation.title || "Untitled");
    open.type = "button";
    open.title = conversation.title;
    open.addEventListener("click", () => selectConversation(conversation.id));
    const remove = element("button", "remove", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete "${conversation.title}"`);
    remove.addEventListener("click", () => deleteConversation(conversation.id));
    item.append(open, remove);
    nav.appendChild(item);
  }
}

function renderAll() {
  renderSidebar();
  renderMessages();
}

function selectConversation(id) {
  if (state.controller) return;  // one answer at a time: stop it first
  state.currentId = id;
  saveConversations();
  renderAll();
  closeSidebar();
}

function deleteConversation(id) {
  if (state.controller && id === state.currentId) return;
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = null;
  saveConversations();
  renderAll();
}

function setStreaming(streaming) {
  document.body.dataset.streaming = String(streaming);
  $("send").hidden = streaming;
  $("stop").hidden = !streaming;
  $("new-chat").disabled = streaming;
}

// ------------------------------------------------------------------------------------------
// server health: GET /health (no key needed), GET /v1/models for the context length

function showHealth(level, text) {
  $("health-dot").className = `dot ${level}`;
  $("health-text").textContent = text;
  const pill = $("health-pill");
  pill.className = `pill ${level}`;
  pill.querySelector(".label").textContent = {ok: "ready", busy: "busy", down: "down"}[level] || level;
  pill.title = text;
}

function healthSummary(health) {
  if (health.status !== "ok") return ["down", `down: ${health.error || "unavailable"}`];
  if (health.busy) {
    return ["busy", health.queued ? `generating, ${health.queued} waiting` : "generating"];
  }
  return ["ok", "ready"];
}

function showModelDetail() {
  const health = state.health || {};
  const workers = health.workers ? health.workers.length : 0;
  const details = [];
  if (state.contextLength) details.push(`context ${state.contextLength} tokens`);
  details.push(workers ? `root + ${workers} worker${workers === 1 ? "" : "s"}` : "one machine");
  if (health.reconnects) details.push(`reconnected ${health.reconnects}×`);
  $("model-detail").textContent = details.join(" · ");
}

function showWorkers(workers) {
  const list = $("workers");
  list.replaceChildren();
  for (const worker of workers || []) {
    const item = element("li", `worker ${worker.status === "ok" ? "ok" : "down"}`);
    item.append(element("span", `dot ${worker.status === "ok" ? "ok" : "down"}`),
                element("span", "", worker.address || worker.name || "worker"));
    if (worker.error) item.title = worker.error;
    list.appendChild(item);
  }
}

async function refreshHealth() {
  clearTimeout(state.healthTimer);
  let level = "down";
  try {
    const response = await fetch("health", {cache: "no-store"});
    const health = await response.json();
    let text;
    [level, text] = healthSummary(health);
    showHealth(level, text);
    $("model-name").textContent = health.model || "–";
    state.health = health;
    showModelDetail();
    showWorkers(health.workers);
    if (!state.modelInfoAsked) loadModelInfo();
  } catch {
    showHealth("down", "server unreachable");
  }
  state.healthTimer = setTimeout(refreshHealth, HEALTH_EVERY_MS[level]);
}

async function loadModelInfo() {
  state.modelInfoAsked = true;
  try {
    const response = await fetch("v1/models", {headers: authHeaders(), cache: "no-store"});
    if (!response.ok) return;  // 401 until the API key is set: the name from /health is enough
    const model = (await response.json()).data[0];
    if (model && model.context_length) state.contextLength = model.context_length;
    showModelDetail();
  } catch {
    state.modelInfoAsked = false;  // the server is unreachable: the next health poll says so and asks again
  }
}

// ------------------------------------------------------------------------------------------
// settings dialog

function fillSettings() {
  for (const key of Object.keys(DEFAULTS)) $(key).value = state.settings[key] ?? "";
}

function readSettings() {
  const settings = {};
  for (const key of Object.keys(DEFAULTS)) settings[key] = $(key).value;
  state.settings = settings;
  localStorage.setItem(STORE.settings, JSON.stringify(settings));
  state.modelInfoAsked = false;  // a new API key may now open /v1/models
  refreshHealth();
}

// ------------------------------------------------------------------------------------------
// sidebar on small screens

function openSidebar() { document.body.classList.add("sidebar-open"); }
function closeSidebar() { document.body.classList.remove("sidebar-open"); }

// ------------------------------------------------------------------------------------------
// wiring

const MAX_INPUT_PX = 200;

function autosize() {
  const input = $("input");
  const border = input.offsetHeight - input.clientHeight;
  input.style.height = "auto";
  const wanted = input.scrollHeight + border;
  input.style.height = `${Math.min(wanted, MAX_INPUT_PX)}px`;
  input.style.overflowY = wanted > MAX_INPUT_PX ? "auto" : "hidden";
}

function submit() {
  const input = $("input");
  const question = input.value.trim();
  if (!question || state.controller) return;
  input.value = "";
  autosize();
  send(question);
}

function start() {
  if (!currentConversation()) state.currentId = null;
  // an answer left "streaming" by a closed tab was cut there
  for (const c of state.conversations) {
    for (const m of c.messages) {
      if (m.stats && ["waiting", "streaming"].includes(m.stats.state)) m.stats.state = "stopped";
    }
  }
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  $("input").addEventListener("input", autosize);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    state.currentId = null;
    saveConversations();
    renderAll();
    closeSidebar();
    $("input").focus();
  });
  $("messages").addEventListener("scroll", () => {
    const box = $("messages");
    stickToEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  });
  $("menu").addEventListener("click", openSidebar);
  $("scrim").addEventListener("click", closeSidebar);
  $("settings-open").addEventListener("click", () => { fillSettings(); $("settings").showModal(); });
  $("settings").addEventListener("close", readSettings);
  $("settings-defaults").addEventListener("click", () => {
    const key = $("api_key").value;  // defaults for sampling, not a reason to forget the key
    for (const [name, value] of Object.entries(DEFAULTS)) $(name).value = value;
    $("api_key").value = key;
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshHealth(); });
  setStreaming(false);
  renderAll();
  autosize();
  refreshHealth();
  $("input").focus();
}

start();
