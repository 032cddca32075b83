-- wrk script of bench_load.py: POST real request bodies to the URL's path, optionally paced.
--
-- Configured by environment variables (read when the script loads, in every wrk state, so
-- that `delay` exists only for a paced run: wrk decides per run whether to call it):
--   WRK_BODIES   file of JSON bodies, one per line (each thread starts at its own offset)
--   WRK_RATE     total requests per second to pace at; 0 or unset = as fast as answered
--   WRK_THREADS  wrk's -t (the rate is shared among the threads)
--   WRK_TOKEN    bearer token sent as Authorization (unset = no header)
--
-- Pacing: wrk is closed-loop (a connection sends its next request when the previous answer
-- is in). Each thread hands out send slots on an absolute schedule, one every
-- WRK_THREADS / WRK_RATE seconds, and `delay()` waits for the connection's slot; with
-- enough connections (rate x latency < connections) the achieved rate is WRK_RATE however
-- fast the answers come. LuaJIT's ffi reads CLOCK_MONOTONIC (os.clock is CPU time).
--
-- `done` prints one line, `WRK_RESULT {json}`, which bench_load.py parses: requests, duration,
-- errors by kind (status = answers of 400 and above) and latency percentiles in microseconds.

local ffi = require("ffi")
pcall(ffi.cdef, [[
typedef struct { long tv_sec; long tv_nsec; } wrk_timespec;
int clock_gettime(int clk_id, wrk_timespec *tp);
]])
local CLOCK_MONOTONIC = 1
local clock = ffi.new("wrk_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end

local rate = tonumber(os.getenv("WRK_RATE") or "0") or 0
local threads = tonumber(os.getenv("WRK_THREADS") or "1") or 1
local token = os.getenv("WRK_TOKEN")
local bodies_file = os.getenv("WRK_BODIES")

local thread_count = 0
function setup(thread)
  thread:set("thread_number", thread_count)
  thread_count = thread_count + 1
end

local requests = {}
local next_request = 1

function init(args)
  local headers = { ["Content-Type"] = "application/json" }
  if token and token ~= "" then
    headers["Authorization"] = "Bearer " .. token
  end
  local handle = assert(io.open(assert(bodies_file, "WRK_BODIES is not set"), "r"))
  for line in handle:lines() do
    if line ~= "" then
      requests[#requests + 1] = wrk.format("POST", nil, headers, line)
    end
  end
  handle:close()
  assert(#requests > 0, "no bodies in " .. bodies_file)
  -- thread_number is set by setup() in the main state before this thread starts.
  local number = tonumber(thread_number) or 0
  next_request = (number * math.floor(#requests / threads)) % #requests + 1
end

function request()
  local chosen = requests[next_request]
  next_request = next_request % #requests + 1
  return chosen
end

if rate > 0 then
  local interval_ms = threads * 1000 / rate
  local next_slot_ms = nil

  function delay()
    local now = now_ms()
    if next_slot_ms == nil or next_slot_ms < now then
      next_slot_ms = now -- fell behind (no connection was free): do not burst to catch up
    end
    local wait = next_slot_ms - now
    next_slot_ms = next_slot_ms + interval_ms
    return wait
  end
end

function done(summary, latency, _)
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"p50": %d, "p90": %d, "p95": %d, "p99": %d, "p999": %d, '
      .. '"mean": %.1f, "stdev": %.1f, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.stdev, latency.max
  ))
end
