-- wrk script for bench/load.sh: sends the pushes of a file written by examples/pushfile.rs,
-- one after another, each once, and counts the answers that are not 2xx.
--
--     wrk -t1 -c64 -d10s --latency -s bench/pushes.lua URL -- FILE FIRST [cycle | stop=N]
--
-- FILE holds whole HTTP requests, each after a line with its length. They are read as they
-- are sent (two buffered reads a request, the same in every case; nothing is held in memory),
-- starting at push FIRST (0-based), so that runs against the same relay use pushes it has not
-- seen. Past the last push the file starts over, and each request sent past it is counted in
-- `wrapped` (to the relay, a WeChat retry answered from its dedupe record: not the case
-- measured) unless `cycle` is given (for nginx, which does not care). With `stop=N` the thread
-- stops sending once N answers were 2xx (wrk itself runs on until -d or SIGINT). done() prints
-- one line for load.sh:
--
--     result requests=N duration_us=N p50_us=N p99_us=N non2xx=N sent=N wrapped=N errors=N

local file
local cycle = false
local stop_at = nil
local passed = false

-- Globals of each thread, read back in done() through thread:get().
sent = 0
non2xx = 0
ok = 0
wrapped = 0

-- The length of the next request, from the file's start again after the last one.
local function next_length()
  local length = file:read("*l")
  if not length then
    file:seek("set", 0)
    passed = true
    length = file:read("*l")
  end
  return tonumber(length)
end

function init(args)
  file = assert(io.open(args[1], "rb"))
  assert(file:read("*l"), "no pushes in " .. args[1])
  file:seek("set", 0)
  cycle = args[3] == "cycle"
  stop_at = tonumber((args[3] or ""):match("^stop=(%d+)$"))
  for _ = 1, tonumber(args[2] or "0") do
    file:seek("cur", next_length())
  end
end

function request()
  local request = file:read(next_length())
  sent = sent + 1
  if passed and not cycle then
    wrapped = wrapped + 1
  end
  return request
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  else
    ok = ok + 1
    if stop_at and ok >= stop_at then
      wrk.thread:stop()
    end
  end
end

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency, requests)
  local total = { sent = 0, non2xx = 0, wrapped = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(total) do
      total[name] = total[name] + thread:get(name)
    end
  end
  local e = summary.errors
  io.write(string.format(
    "result requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d sent=%d wrapped=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    total.non2xx, total.sent, total.wrapped, e.connect + e.read + e.write + e.timeout))
end
