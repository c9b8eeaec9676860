-- wrk script: each request is one enrolled device checking in with a fresh nonce.
local creds = {}
for line in io.lines(os.getenv("EDGEFLEET_BENCH_CREDS")) do table.insert(creds, line) end
local counter = 0
local tid = 0
function setup(thread) tid = tid + 1; thread:set("tid", tid) end
function request()
  counter = counter + 1
  local id, cred = creds[(counter * 7 + (tid or 1) * 1301) % #creds + 1]:match("(%S+) (%S+)")
  local body = '{"device_id":"' .. id .. '","nonce":"' .. string.format("%016x%016x", tid or 0, counter)
    .. '","firmware_version":"14.0.0"}'
  return wrk.format("POST", "/v1/devices/" .. id .. "/check-in",
    {["Authorization"] = "Bearer " .. cred, ["Content-Type"] = "application/json"}, body)
end
