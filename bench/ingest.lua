-- wrk script for bench/ingest.py: POST pre-signed webhooks, each body used once.
-- The bodies file has one request per line: timestamp TAB signature TAB body.
-- Thread k of n sends lines k, k+n, k+2n, ...; running out is counted, never wrapped
-- (a reused body would be a duplicate, not a new event).

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local path, nthreads = args[1], tonumber(args[2])
  requests_ = {}
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == id then
      local stamp, signature, body = line:match("^([^\t]+)\t([^\t]+)\t(.*)$")
      requests_[#requests_ + 1] = wrk.format("POST", "/webhooks/pacspace", {
        ["Content-Type"] = "application/json",
        ["X-PacSpace-Timestamp"] = stamp,
        ["X-PacSpace-Signature"] = signature,
      }, body)
    end
    i = i + 1
  end
  next_ = 1
  sent = 0
  exhausted = 0
  ok2xx = 0
  recorded = 0
  other = 0
end

function request()
  if next_ > #requests_ then
    exhausted = exhausted + 1
    -- nothing new to send: a GET that the counters below keep apart from webhooks
    return wrk.format("GET", "/readyz")
  end
  local r = requests_[next_]
  next_ = next_ + 1
  sent = sent + 1
  return r
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    if body:find('"recorded"', 1, true) then
      recorded = recorded + 1
      ok2xx = ok2xx + 1
    elseif not body:find('"ready"', 1, true) then
      ok2xx = ok2xx + 1
    end
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local t = {sent = 0, ok2xx = 0, recorded = 0, other = 0, exhausted = 0}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + thread:get(k) end
  end
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"sent": %d, "ok2xx": %d, "recorded": %d, "other": %d, "exhausted": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout,
    t.sent, t.ok2xx, t.recorded, t.other, t.exhausted))
end
