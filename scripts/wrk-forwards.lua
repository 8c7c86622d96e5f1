-- wrk script: POSTs pre-packed forward envelopes, each once (scripts/pgload.sh).
--
--   WRK_ENVELOPES=/tmp/envs.txt WRK_THREADS=1 wrk -t1 -c64 -d10s -s scripts/wrk-forwards.lua http://127.0.0.1:8000/
--
-- WRK_ENVELOPES: one envelope per line (`fwd_cost pack`). Thread t of WRK_THREADS takes lines
-- t, t+WRK_THREADS, ... Requests are pre-formatted in init(), so the timed part only writes
-- them. When a thread has sent all its envelopes it starts over and the mediator's dedup
-- answers the repeats: done() says how many were repeats (make the file larger than the run).

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local path = os.getenv("WRK_ENVELOPES") or error("WRK_ENVELOPES is not set")
  local nthreads = tonumber(os.getenv("WRK_THREADS") or "1")
  reqs = {}
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == id then
      reqs[#reqs + 1] = wrk.format("POST", nil, { ["Content-Type"] = "application/didcomm-envelope-enc" }, line)
    end
    i = i + 1
  end
  if #reqs == 0 then
    error("no envelopes for thread " .. id)
  end
  nreqs = #reqs
  idx = 0
  sent = 0
end

function request()
  idx = idx + 1
  sent = sent + 1
  if idx > #reqs then
    idx = 1
  end
  return reqs[idx]
end

function done(summary, latency, requests)
  local total, repeats = 0, 0
  for _, t in ipairs(threads) do
    local n = t:get("sent") or 0
    local have = t:get("nreqs") or 0
    total = total + n
    if n > have then
      repeats = repeats + n - have
    end
  end
  io.write(string.format("wrk-forwards: %d requests written, %d of them repeats of an envelope\n", total, repeats))
  io.write(string.format("wrk-forwards: latency p50 %.2f ms, p99 %.2f ms\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
