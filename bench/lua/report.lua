-- Shared by every scenario script: at the end of a run, print one machine-readable
-- line (latencies in microseconds) that bench/run.sh hands to benchtool.py record.
-- non2xx counts answers outside 2xx/3xx; timeout uses wrk's --timeout.
-- A script may list extra counters in `report_fields`; each thread publishes them with
-- wrk.thread:set(name, n) and done() (which runs in another Lua state) sums them.
report_fields = report_fields or {}
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  local extra = ""
  for _, name in ipairs(report_fields) do
    local total = 0
    for _, t in ipairs(threads) do total = total + (tonumber(t:get(name)) or 0) end
    extra = extra .. string.format(',"%s":%d', name, total)
  end
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_s":%.3f,"rps":%.2f,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"non2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d%s}\n',
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    e.status, e.connect, e.read, e.write, e.timeout, extra))
end
