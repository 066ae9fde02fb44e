-- GET at a paced rate (wrk has no fixed-rate mode; wrk2's -R is not in Debian).
-- Each connection waits a random 0..2*MEAN_DELAY_MS (uniform, mean MEAN_DELAY_MS) before
-- each request, so C connections offer about C / (MEAN_DELAY + latency) requests/s,
-- spread out rather than in lock-step. wrk starts its latency clock after the delay,
-- so the figures are service + queueing time, as with a fixed-rate client.
--   wrk ... -s lua/paced_get.lua URL -- TOKEN MEAN_DELAY_MS ["Header: value" ...]
local dir = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
dofile(dir .. "report.lua")
local common = dofile(dir .. "common.lua")

local span = 0

function init(args)
  local token = args[1]
  if token and token ~= "" and token ~= "-" then
    wrk.headers["Authorization"] = "Bearer " .. token
  end
  span = 2 * tonumber(args[2] or "10")
  for i = 3, #args do
    local name, value = common.header(args[i])
    if name then wrk.headers[name] = value end
  end
  -- os.time() is per second; add the table address so threads and runs differ
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
end

function delay()
  return math.random(0, span)
end
