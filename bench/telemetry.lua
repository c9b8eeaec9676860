-- wrk script: each request uploads a new batch (unique sequence) of WINDOWS telemetry windows.
-- EDGEFLEET_BENCH_SHAPE: "hourly" (default): a batch holds consecutive hourly windows (one or two
-- event-time days), as a device that syncs uploads them; "scattered": the first shape of this
-- script, each batch's windows spread one per day over 7 days (so nearly every window has a day
-- rollup of its own when folded).
local creds = {}
for line in io.lines(os.getenv("EDGEFLEET_BENCH_CREDS")) do table.insert(creds, line) end
local windows = tonumber(os.getenv("EDGEFLEET_BENCH_WINDOWS") or "10")
local shape = os.getenv("EDGEFLEET_BENCH_SHAPE") or "hourly"
-- The published bundle the windows name: the server checks each window against its manifest.
local bundle = os.getenv("EDGEFLEET_BENCH_BUNDLE")
local epoch = os.time()
local counter = 0
local tid = 0
function setup(thread) tid = tid + 1; thread:set("tid", tid) end
-- The start of window w (1..windows) of batch number c, within the 7 days from 2026-03-01.
local function start(c, w)
  if shape == "scattered" then
    local hour = c + w
    return string.format("2026-03-%02dT%02d:00:00+00:00", hour % 7 + 1, hour % 10)
  end
  local hour = (c * windows + w - 1) % (7 * 24)
  return string.format("2026-03-%02dT%02d:00:00+00:00", math.floor(hour / 24) + 1, hour % 24)
end
local function window(id, c, w)
  return '{"device_id":"' .. id .. '","model":"m00","version":"1.2.3","bundle_sha256":"'
    .. bundle .. '","window_start":"' .. start(c, w) .. '","window_s":3600,"inference_count":12,'
    .. '"error_count":0,"latency":{"relative_accuracy":0.01,"bins":{"-345":5,"-340":7},'
    .. '"count":12,"sum":0.012,"min":0.0009,"max":0.0011},'
    .. '"outputs":[{"name":"label","counts":[6,4,2]}],"inputs":[{"name":"x0","counts":[2,8,2]}]}'
end
function request()
  counter = counter + 1
  local id, cred = creds[(counter * 7 + (tid or 1) * 1301) % #creds + 1]:match("(%S+) (%S+)")
  local parts = {}
  for w = 1, windows do parts[w] = window(id, counter, w) end
  local body = '{"device_id":"' .. id .. '","boot_epoch":' .. epoch .. ',"sequence":'
    .. (counter * 16 + (tid or 0)) .. ',"windows":[' .. table.concat(parts, ",") .. ']}'
  return wrk.format("POST", "/v1/devices/" .. id .. "/telemetry",
    {["Authorization"] = "Bearer " .. cred, ["Content-Type"] = "application/json"}, body)
end
