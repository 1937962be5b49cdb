-- Send each stable study's image instances to ainode for analysis, once each: never the SR
-- series (ainode's own reports would travel back to it), and never an instance already sent.
-- The SR that ainode stores back makes the study unstable, then stable again; without the
-- "AinodeSent" mark (UserMetadata in orthanc.json) the whole study would be sent a second time.
local function alreadySent(instanceId)
  for _, name in ipairs(ParseJson(RestApiGet('/instances/' .. instanceId .. '/metadata'))) do
    if name == 'AinodeSent' then
      return true
    end
  end
  return false
end

function OnStableStudy(studyId, tags, metadata)
  local unsent = {}
  for _, s in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if s['MainDicomTags']['Modality'] ~= 'SR' then
      for _, instanceId in ipairs(s['Instances']) do
        if not alreadySent(instanceId) then
          table.insert(unsent, instanceId)
        end
      end
    end
  end
  if #unsent > 0 then
    RestApiPost('/modalities/ainode/store', DumpJson({ Resources = unsent }))
    for _, instanceId in ipairs(unsent) do
      RestApiPut('/instances/' .. instanceId .. '/metadata/AinodeSent', 'yes')
    end
  end
end
