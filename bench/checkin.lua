-- wrk script: each request is one enrolled device checking in with a fresh nonce, reporting the
-- models it runs (the JSON list in the file EDGEFLEET_BENCH_INSTALLED, when set): the same state
-- at every check-in, as a settled fleet reports it.
local creds = {}
for line in io.lines(os.getenv("EDGEFLEET_BENCH_CREDS")) do table.insert(creds, line) end
local installed = ""
local installed_path = os.getenv("EDGEFLEET_BENCH_INSTALLED")
if installed_path then
  local f = io.open(installed_path)
  installed = ',"installed":' .. f:read("*a"):gsub("%s+$", "")
  f:close()
end
local counter = 0
local tid = 0
function setup(thread) tid = tid + 1; thread:set("tid", tid) end
function request()
  counter = counter + 1
  local id, cred = creds[(counter * 7 + (tid or 1) * 1301) % #creds + 1]:match("(%S+) (%S+)")
  local body = '{"device_id":"' .. id .. '","nonce":"' .. string.format("%016x%016x", tid or 0, counter)
    .. '","firmware_version":"14.0.0"' .. installed .. '}'
  return wrk.format("POST", "/v1/devices/" .. id .. "/check-in",
    {["Authorization"] = "Bearer " .. cred, ["Content-Type"] = "application/json"}, body)
end
