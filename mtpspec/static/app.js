// The mtpspec playground: streams completions from this server's OpenAI API and shows where
// every token came from. It uses the public API only: GET /v1/models for the model and method,
// and streamed /v1/completions or /v1/chat/completions with two documented extensions:
// stream_options.include_draft (each chunk lists its tokens: {id, from_draft, drafted}) and
// draft_k (0 decodes the request plainly, for the side-by-side comparison).
// A verification step emits its accepted drafts, then one target token: the bonus when every
// draft was accepted, else the correction of the first rejected draft. Model text is only ever
// put into the page as text (textContent), never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { card: null, maxK: 0, history: [], controller: null, busy: false };

// --- talking to the server ---------------------------------------------------------------------

function headers() {
  const key = $("api-key").value.trim();
  const out = { "Content-Type": "application/json" };
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (err) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadCard() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    setStatus("error", `model card: ${await errorText(response)}`);
    return;
  }
  const card = (await response.json()).data[0];
  const spec = card.speculative || {};
  state.card = card;
  state.maxK = spec.draft_k || 0;
  const method = state.maxK > 0
    ? `${spec.method} drafter, up to ${state.maxK} drafts per step`
    : "plain decoding (this server runs without a drafter)";
  $("model-line").textContent = `${card.id} · ${method} · context ${card.context_length} tokens`;
  $("draft-k").max = String(state.maxK);
  $("draft-k").value = String(state.maxK);
  setBusy(state.busy);
  $("pane-spec").querySelector(".pane-k").textContent = `up to ${state.maxK} drafts per step`;
  if (card.chat_template && !$("mode").dataset.touched) {
    $("mode").value = "chat";
    $("prompt").value = "Name the planets of the solar system in order.";
    showMode();
  }
  setStatus("idle", "ready");
}

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function requestBody(draftK) {
  const chat = $("mode").value === "chat";
  const body = {
    model: state.card ? state.card.id : undefined,
    max_tokens: numberField("max-tokens"),
    temperature: numberField("temperature"),
    top_p: numberField("top-p"),
    stream: true,
    stream_options: { include_usage: true, include_draft: true },
    draft_k: draftK,
  };
  const topK = numberField("top-k");
  if (topK) body.top_k = topK;
  const seed = numberField("seed");
  if (seed !== null) body.seed = seed;
  const prompt = $("prompt").value;
  if (chat) body.messages = [...state.history, { role: "user", content: prompt }];
  else body.prompt = prompt;
  return body;
}

// Stream one request into a pane; resolves to the pane's tally when the stream has ended.
async function stream(pane, body, signal) {
  pane.reset();
  const chat = "messages" in body;
  const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice("data: ".length);
      if (data === "[DONE]") return pane.finish();
      const payload = JSON.parse(data);
      if (payload.error) throw new Error(payload.error.message);
      pane.take(payload, chat);
    }
  }
  throw new Error("the stream ended without [DONE]");
}

// --- a pane: output with marked tokens, live figures, and the per-step strip --------------------

class Pane {
  constructor(element) {
    this.element = element;
    this.output = element.querySelector(".output");
    this.statsLine = element.querySelector(".stats");
    this.strip = element.querySelector(".steps");
  }

  reset() {
    this.output.textContent = "";
    this.strip.textContent = "";
    this.text = "";
    this.tokens = 0;
    this.steps = 0;          // verification steps after the prompt's first token
    this.drafted = 0;
    this.accepted = 0;
    this.stepAccepted = 0;   // drafts accepted so far in the current step
    this.start = performance.now();
    this.first = null;
    this.last = null;
    this.usage = null;
    this.element.dataset.state = "streaming";
    this.render();
  }

  // One chunk: its text as one span, classed by where its tokens came from.
  take(payload, chat) {
    const choice = payload.choices[0];
    if (!choice) {
      this.usage = payload.usage || null;
      return;
    }
    const text = chat ? (choice.delta.content || "") : (choice.text || "");
    const kinds = [];
    const now = performance.now();
    for (const entry of choice.tokens || []) {
      kinds.push(this.count(entry));
      if (this.first === null) this.first = now;
      this.last = now;
    }
    if (text) this.append(text, kinds);
    this.render();
  }

  // Where one token came from; closes a step at the target's token.
  count(entry) {
    this.tokens += 1;
    if (entry.from_draft) {
      this.stepAccepted += 1;
      return "draft";
    }
    const accepted = this.stepAccepted;
    this.stepAccepted = 0;
    if (this.tokens === 1) return "plain";  // the prompt's first token: no step before it
    this.steps += 1;
    this.drafted += entry.drafted;
    this.accepted += accepted;
    this.addStep(entry.drafted, accepted);
    if (entry.drafted === 0) return "plain";
    return accepted >= entry.drafted ? "bonus" : "correction";
  }

  append(text, kinds) {
    const span = document.createElement("span");
    span.textContent = text;
    const unique = [...new Set(kinds)];
    const kind = unique.length === 0 ? "held" : unique.length === 1 ? unique[0] : "mixed";
    span.className = `tok ${kind}`;
    if (kinds.length && kinds[kinds.length - 1] !== "draft") span.classList.add("step-end");
    span.title = kinds.length ? kinds.join(" + ") : "text held back until the end";
    this.output.appendChild(span);
    this.text += text;
  }

  addStep(drafted, accepted) {
    if (!this.strip || this.strip.hidden) return;
    const unit = 34 / Math.max(state.maxK, 1);
    const bar = document.createElement("div");
    bar.className = accepted >= drafted && drafted > 0 ? "step full" : "step";
    bar.style.height = `${Math.max(drafted * unit, 1)}px`;
    bar.title = `step ${this.steps}: ${accepted} of ${drafted} drafts accepted`;
    const inner = document.createElement("div");
    inner.className = "accepted";
    inner.style.height = `${accepted * unit}px`;
    bar.appendChild(inner);
    this.strip.appendChild(bar);
  }

  get rate() {  // decode tokens per second: tokens after the first over the time after it
    if (this.tokens < 2 || this.last <= this.first) return null;
    return (this.tokens - 1) / ((this.last - this.first) / 1000);
  }

  render() {
    const rate = this.rate;
    const tau = this.steps ? (this.tokens - 1) / this.steps : null;
    const parts = [
      `${this.tokens} tokens`,
      `${rate === null ? "-" : rate.toFixed(1)} tok/s`,
      `first token ${this.first === null ? "-" : Math.round(this.first - this.start) + " ms"}`,
      `${this.steps} steps`,
      `tau ${tau === null ? "-" : tau.toFixed(2)}`,
      `acceptance ${this.drafted ? (100 * this.accepted / this.drafted).toFixed(1) + "%" : "-"}`
        + ` (${this.accepted}/${this.drafted} drafts)`,
    ];
    this.statsLine.textContent = parts.join(" · ");
    this.element.dataset.tokens = String(this.tokens);
    this.element.dataset.accepted = String(this.accepted);
  }

  finish() {
    this.element.dataset.state = "done";
    this.render();
    return this;
  }
}

// --- the controls --------------------------------------------------------------------------------

const panes = {};

function setStatus(kind, message) {
  $("status").dataset.state = kind;
  $("status").textContent = message;
}

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("compare").disabled = busy || state.maxK === 0;  // a server without a drafter: nothing to compare
  $("stop").disabled = !busy;
}

function showMode() {
  const chat = $("mode").value === "chat";
  $("new-chat").hidden = !chat;
  renderTranscript();
}

function renderTranscript() {
  const box = $("transcript");
  box.textContent = "";
  box.hidden = $("mode").value !== "chat" || state.history.length === 0;
  for (const message of state.history) {
    const turn = document.createElement("div");
    const role = document.createElement("span");
    role.className = "turn-role";
    role.textContent = `${message.role}: `;
    turn.append(role, document.createTextNode(message.content));
    box.appendChild(turn);
  }
}

function remember(text) {
  if ($("mode").value !== "chat") return;
  state.history.push({ role: "user", content: $("prompt").value },
                     { role: "assistant", content: text });
  $("prompt").value = "";
  renderTranscript();
}

function draftK() {
  const k = numberField("draft-k");
  return k === null ? state.maxK : Math.min(Math.max(0, Math.round(k)), state.maxK);
}

async function guarded(work) {
  if (state.busy) return;
  setBusy(true);
  state.controller = new AbortController();
  try {
    await work(state.controller.signal);
  } catch (err) {
    const aborted = err.name === "AbortError";
    for (const pane of Object.values(panes)) {
      if (pane.element.dataset.state === "streaming") pane.element.dataset.state = aborted ? "stopped" : "error";
    }
    setStatus(aborted ? "idle" : "error", aborted ? "stopped" : String(err.message || err));
  } finally {
    setBusy(false);
    state.controller = null;
  }
}

async function generate() {
  await guarded(async (signal) => {
    $("verdict").hidden = true;
    $("pane-plain").hidden = true;
    const k = draftK();
    $("pane-spec").querySelector(".pane-title").textContent =
      k > 0 ? "speculative decoding" : "plain decoding";
    $("pane-spec").querySelector(".pane-k").textContent = `draft_k ${k}`;
    setStatus("busy", "generating…");
    const spec = await stream(panes.spec, requestBody(k), signal);
    remember(spec.text);
    setStatus("done", "done");
  });
}

async function compare() {
  await guarded(async (signal) => {
    const k = draftK();
    if (numberField("temperature") > 0 && numberField("seed") === null) {
      $("seed").value = String(Math.floor(Math.random() * 1e9));  // the same draws for both runs
    }
    $("verdict").hidden = true;
    $("pane-plain").hidden = false;
    $("pane-spec").querySelector(".pane-title").textContent = "speculative decoding";
    $("pane-spec").querySelector(".pane-k").textContent = `draft_k ${k}`;
    panes.spec.reset();
    setStatus("busy", "plain decoding…");
    const plain = await stream(panes.plain, requestBody(0), signal);
    setStatus("busy", "speculative decoding…");
    const spec = await stream(panes.spec, requestBody(k), signal);
    const identical = plain.text === spec.text;
    const speedup = plain.rate && spec.rate ? spec.rate / plain.rate : null;
    const verdict = $("verdict");
    verdict.dataset.identical = String(identical);
    verdict.textContent = (identical ? "identical text ✓" : "the texts differ ✗")
      + ` · plain ${plain.rate === null ? "-" : plain.rate.toFixed(1)} tok/s,`
      + ` speculative ${spec.rate === null ? "-" : spec.rate.toFixed(1)} tok/s`
      + (speedup === null ? "" : ` · ${speedup.toFixed(2)}x`);
    verdict.hidden = false;
    remember(spec.text);
    setStatus("done", "done");
  });
}

function start() {
  panes.plain = new Pane($("pane-plain"));
  panes.spec = new Pane($("pane-spec"));
  panes.plain.strip.hidden = true;  // nothing is drafted there
  $("generate").addEventListener("click", generate);
  $("compare").addEventListener("click", compare);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("mode").addEventListener("change", () => { $("mode").dataset.touched = "1"; showMode(); });
  $("new-chat").addEventListener("click", () => { state.history = []; renderTranscript(); });
  $("api-key").addEventListener("change", loadCard);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
  });
  showMode();
  loadCard().catch((err) => setStatus("error", String(err.message || err)));
}

document.addEventListener("DOMContentLoaded", start);
