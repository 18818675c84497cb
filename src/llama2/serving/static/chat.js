// The web chat page: keeps the conversation in the page, sends it to /v1/chat/completions with
// stream=true, and appends the server-sent deltas to the last reply as they arrive. Stop aborts the
// fetch, which makes the server cancel the generation and free its batch row.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // completed turns: {role, content}
let controller = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// Yields the JSON objects of an OpenAI event stream ("data: {...}\n\n" ... "data: [DONE]").
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  const system = $("system").value.trim();
  const turn = {role: "user", content: text};
  const messages = (system ? [{role: "system", content: system}] : []).concat(history, [turn]);
  addMessage("user", text);
  const reply = addMessage("assistant streaming", "");
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "";
  let content = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: $("model-name").textContent || "llama2",
        messages,
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value) || undefined,
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        content += choice.delta.content;
        reply.textContent = content;
        reply.scrollIntoView({block: "end"});
      }
      if (choice && choice.finish_reason === "length") $("status").textContent = "(reply cut at max tokens)";
    }
    history.push(turn, {role: "assistant", content});
  } catch (err) {
    if (err.name === "AbortError") {
      $("status").textContent = "(stopped)";
      history.push(turn, {role: "assistant", content});  // keep the partial reply, as a chat UI does
    } else {
      reply.remove();
      addMessage("error", `Error: ${err.message}`);
    }
  } finally {
    reply.classList.remove("streaming");
    controller = null;
    setBusy(false);
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  $("status").textContent = "";
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });

fetch("/health").then((r) => r.json()).then((h) => { $("model-name").textContent = h.model; }).catch(() => {});
