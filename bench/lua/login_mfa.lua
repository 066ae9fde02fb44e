-- POST /auth/login/mfa alone: each request spends the next line of TOKENS_FILE,
-- `MFA_TOKEN FIRST_STEP CODE...` (benchtool.py mint-totp --tokens: a pre-made mfa_token of its
-- own user and the pyotp codes of the RFC 6238 time steps FIRST_STEP, FIRST_STEP+1, ...),
-- with the code of the time step the request is sent in (os.time() // 30).
--   wrk ... -s lua/login_mfa.lua URL -- TOKENS_FILE
-- Use -t1. Past the end of the file, or past the last code written, the requests carry an
-- unknown token (401, counted as non-2xx) and the result line says "exhausted" / "stale".
report_fields = { "pool", "exhausted", "stale" }
local dir = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
dofile(dir .. "report.lua")

local lines, i, exhausted, stale = {}, 0, 0, 0
local headers = { ["Content-Type"] = "application/json" }
local verified = false  -- wrk's check call of request() before the run is never sent

function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then lines[#lines + 1] = line end
  end
  wrk.thread:set("pool", #lines)
  wrk.thread:set("exhausted", 0)
  wrk.thread:set("stale", 0)
end

local function body(token, code)
  return '{"mfa_token":"' .. token .. '","code":"' .. code .. '"}'
end

function request()
  if not verified then
    verified = true
    return wrk.format("POST", nil, headers, body("x", "000000"))
  end
  i = i + 1
  local line = lines[i]
  if line == nil then
    exhausted = exhausted + 1
    wrk.thread:set("exhausted", exhausted)
    return wrk.format("POST", nil, headers, body("none-left", "000000"))
  end
  local fields = {}
  for f in line:gmatch("%S+") do fields[#fields + 1] = f end
  local code = fields[3 + math.floor(os.time() / 30) - tonumber(fields[2])]
  if code == nil then
    stale = stale + 1
    wrk.thread:set("stale", stale)
    code = "000000"
  end
  return wrk.format("POST", nil, headers, body(fields[1], code))
end
