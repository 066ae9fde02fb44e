-- POST /auth/logout, each request spending the next token of TOKENS_FILE (one per line).
--   wrk ... -s lua/logout.lua URL -- TOKENS_FILE
-- Use -t1. Past the end of the file the requests carry no token (204 as well, but not
-- the work named): the result line then says "exhausted": N and run.sh flags the run.
report_fields = { "pool", "exhausted" }
local dir = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
dofile(dir .. "report.lua")

local tokens, i, exhausted = {}, 0, 0
local bare = {}
-- wrk calls request() once on thread 0 before the run only to check the script (it counts the
-- requests for pipelining) and never sends that one: it must not spend a token.
local verified = false

function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then tokens[#tokens + 1] = line end
  end
  wrk.thread:set("pool", #tokens)
  wrk.thread:set("exhausted", 0)
end

function request()
  if not verified then
    verified = true
    return wrk.format("POST", nil, { Authorization = "Bearer " .. (tokens[1] or "") }, nil)
  end
  i = i + 1
  local token = tokens[i]
  if token == nil then
    exhausted = exhausted + 1
    wrk.thread:set("exhausted", exhausted)
    return wrk.format("POST", nil, bare, nil)
  end
  return wrk.format("POST", nil, { Authorization = "Bearer " .. token }, nil)
end
