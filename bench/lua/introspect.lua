-- RFC 7662 introspection as tessera's POST /auth/introspect wants it:
-- form body token=<TOKEN>, the caller authenticated by its service key.
--   wrk ... -s lua/introspect.lua URL -- SERVICE_KEY TOKEN
local dir = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
dofile(dir .. "report.lua")
local common = dofile(dir .. "common.lua")

function init(args)
  wrk.method = "POST"
  wrk.headers["Authorization"] = "Bearer " .. args[1]
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
  wrk.body = "token=" .. common.urlencode(args[2])
end
