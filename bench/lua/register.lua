-- POST /auth/register with a new email each time (bench-<RUN_TAG>-<n>@example.com).
--   wrk ... -s lua/register.lua URL -- RUN_TAG PASSWORD POLICY_VERSION
-- RUN_TAG must differ between wrk runs against the same database (409 email_taken otherwise).
local dir = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
dofile(dir .. "report.lua")
local common = dofile(dir .. "common.lua")

local tag, password, policy, n = "", "", "", 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  tag, password, policy = args[1], args[2], args[3]
end

function request()
  n = n + 1
  local body = '{"email":"bench-' .. tag .. '-' .. n .. '@example.com"' ..
               ',"password":' .. common.jsonstr(password) ..
               ',"is_adult":true,"policy_version":' .. common.jsonstr(policy) .. '}'
  return wrk.format("POST", nil, headers, body)
end
