-- Helpers for the scenario scripts; loaded with dofile next to the script.
local M = {}

function M.urlencode(s)
  return (s:gsub("[^%w%-%._~]", function(c)
    return string.format("%%%02X", string.byte(c))
  end))
end

function M.jsonstr(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end) .. '"'
end

-- "Name: value" -> name, value (nil for anything else)
function M.header(arg)
  return arg:match("^([%w%-]+):%s*(.*)$")
end

return M
