-- POST /auth/login (JSON) with the same credentials, back to back.
--   wrk ... -s lua/login.lua URL -- EMAIL PASSWORD [TOKENS_FILE]
-- With TOKENS_FILE, each access_token of a 200 answer is appended to it. Use -t1 with it.
local dir = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
dofile(dir .. "report.lua")
local common = dofile(dir .. "common.lua")

local tokens_file = nil

function init(args)
  tokens_file = args[3]
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"email":' .. common.jsonstr(args[1]) ..
             ',"password":' .. common.jsonstr(args[2]) .. '}'
end

function response(status, headers, body)
  if tokens_file and status == 200 then
    local token = body:match('"access_token"%s*:%s*"([^"]+)"')
    if token then
      local f = io.open(tokens_file, "a")
      f:write(token, "\n")
      f:close()
    end
  end
end
