-- GET the URL given to wrk, optionally with a bearer token and extra headers.
--   wrk ... -s lua/get.lua http://127.0.0.1:PORT/me -- TOKEN ["DNT: 1" ...]
-- No request() function: wrk keeps its fast static path (one pre-built request).
local dir = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
dofile(dir .. "report.lua")
local common = dofile(dir .. "common.lua")

function init(args)
  local token = args[1]
  if token and token ~= "" and token ~= "-" then
    wrk.headers["Authorization"] = "Bearer " .. token
  end
  for i = 2, #args do
    local name, value = common.header(args[i])
    if name then wrk.headers[name] = value end
  end
end
